"""The cosell-sync Airflow plugin: registered through the ``airflow.plugins`` entry point.

It adds the listener that writes each sync run's report into the DAG run's note, and the
Partner Center webhook receiver, mounted on the API server at
``/cosell/webhooks/partner-center`` (see :mod:`cosell_sync.webhooks.receiver`). The
receiver app is built on its first request, so loading the plugin imports no FastAPI and
touches neither the network nor the state DB.

It also adds the Co-sell page (:mod:`cosell_sync.ui`): a FastAPI app at ``/cosell/ui``,
behind Airflow's authentication, listed in Airflow's navigation as "Co-sell". Both share the
plugin's one ``/cosell`` mount (:class:`cosell_sync.ui.CosellMount` sends ``/cosell/ui...`` to
the page, the rest to the receiver): Starlette matches mounts by prefix, in order, so a
second mount at ``/cosell/ui`` would be shadowed by ``/cosell``.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from cosell_sync import ui
from cosell_sync.listeners import run_notes
from cosell_sync.webhooks.receiver import URL_PREFIX, ReceiverApp


class CosellSyncPlugin(AirflowPlugin):
    name = "cosell_sync"
    listeners = [run_notes]
    # one app at /cosell: /cosell/ui is the Co-sell page, the rest the webhook receiver as before
    fastapi_apps = [
        {
            "app": ui.CosellMount(ui=ui.UiApp(), other=ReceiverApp()),
            "url_prefix": URL_PREFIX,
            "name": "cosell-sync webhooks and Co-sell page",
        }
    ]
    external_views = [ui.EXTERNAL_VIEW]
