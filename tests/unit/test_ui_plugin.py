"""How the plugin hands the Co-sell page to Airflow: a "Co-sell" navigation entry Airflow's
plugin serializer accepts, and one ``/cosell`` mount that sends ``/cosell/ui...`` to the page
and everything else to the webhook receiver."""

from __future__ import annotations

import hashlib
import hmac

from fastapi import FastAPI
from fastapi.testclient import TestClient

from cosell_sync import ui


def _echo(name: str):
    async def app(scope, receive, send):
        body = f"{name} root={scope['root_path']} path={scope['path']}".encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": body})

    return app


def test_the_plugin_lists_a_co_sell_nav_entry_and_mounts_both_apps_at_cosell():
    from airflow.api_fastapi.app import RESERVED_URL_PREFIXES
    from airflow.api_fastapi.core_api.datamodels.plugins import ExternalViewResponse

    from cosell_sync.plugin import CosellSyncPlugin
    from cosell_sync.webhooks.receiver import ReceiverApp

    (view,) = CosellSyncPlugin.external_views
    parsed = ExternalViewResponse.model_validate(view)
    assert (parsed.name, parsed.href, parsed.destination) == ("Co-sell", "/cosell/ui/", "nav")
    (entry,) = CosellSyncPlugin.fastapi_apps
    assert entry["url_prefix"] == "/cosell" and not entry["url_prefix"].startswith(tuple(RESERVED_URL_PREFIXES))
    assert isinstance(entry["app"], ui.CosellMount)
    assert isinstance(entry["app"].ui, ui.UiApp) and isinstance(entry["app"].other, ReceiverApp)


def test_cosell_mount_dispatches_ui_paths_to_the_page():
    parent = FastAPI()
    parent.mount("/cosell", ui.CosellMount(ui=_echo("ui"), other=_echo("receiver")))
    with TestClient(parent) as c:
        assert c.get("/cosell/ui/").text == "ui root=/cosell/ui path=/cosell/ui/"
        assert c.get("/cosell/ui/api/overview").text.startswith("ui root=/cosell/ui")
        assert c.get("/cosell/ui").text.startswith("ui ")
        assert c.get("/cosell/webhooks/partner-center").text.startswith("receiver root=/cosell ")
        assert c.get("/cosell/uix").text.startswith("receiver ")  # a prefix of a segment is not the page


def test_csrf_token_is_bound_to_the_user_and_the_key():
    from cosell_sync.ui.app import csrf_token

    class User:
        def __init__(self, ident):
            self.ident = ident

        def get_id(self):
            return self.ident

    alice = csrf_token(User("alice"), key=b"k1")
    assert alice == hmac.new(b"k1", b"cosell-ui-csrf:alice", hashlib.sha256).hexdigest()
    assert alice != csrf_token(User("bob"), key=b"k1") and alice != csrf_token(User("alice"), key=b"k2")
