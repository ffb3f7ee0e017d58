"""The cosell-sync Airflow plugin: registered through the ``airflow.plugins`` entry point.

It adds the listener that writes each sync run's report into the DAG run's note, and the
Partner Center webhook receiver, mounted on the API server at
``/cosell/webhooks/partner-center`` (see :mod:`cosell_sync.webhooks.receiver`). The
receiver app is built on its first request, so loading the plugin imports no FastAPI and
touches neither the network nor the state DB.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from cosell_sync.listeners import run_notes
from cosell_sync.webhooks.receiver import URL_PREFIX, ReceiverApp


class CosellSyncPlugin(AirflowPlugin):
    name = "cosell_sync"
    listeners = [run_notes]
    fastapi_apps = [{"app": ReceiverApp(), "url_prefix": URL_PREFIX, "name": "cosell-sync webhooks"}]
