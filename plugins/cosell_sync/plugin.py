"""The cosell-sync Airflow plugin: registered through the ``airflow.plugins`` entry point.

It adds the listener that writes each sync run's report into the DAG run's note, and the
Partner Center webhook receiver, mounted on the API server at
``/cosell/webhooks/partner-center`` (see :mod:`cosell_sync.webhooks.receiver`). The
receiver app is built on its first request, so loading the plugin imports no FastAPI and
touches neither the network nor the state DB.

It also adds the Co-sell page (:mod:`cosell_sync.ui`): a FastAPI app at ``/cosell/ui``,
behind Airflow's authentication, listed in Airflow's navigation as "Co-sell". It is mounted
before the receiver: Starlette matches mounts in order, and ``/cosell`` would take
``/cosell/ui`` too.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from cosell_sync import ui
from cosell_sync.listeners import run_notes
from cosell_sync.webhooks.receiver import URL_PREFIX, ReceiverApp


class CosellSyncPlugin(AirflowPlugin):
    name = "cosell_sync"
    listeners = [run_notes]
    fastapi_apps = [
        {"app": ui.UiApp(), "url_prefix": ui.URL_PREFIX, "name": "cosell-sync Co-sell page"},
        {"app": ReceiverApp(), "url_prefix": URL_PREFIX, "name": "cosell-sync webhooks"},
    ]
    external_views = [ui.EXTERNAL_VIEW]
