"""The Co-sell page in the Airflow UI (issue 15): a server-rendered FastAPI app mounted at
``/cosell/ui`` on the API server, listed in Airflow's navigation as "Co-sell".

Importing this package imports neither FastAPI nor Airflow's API server: the app is built
on its first request (:class:`cosell_sync.ui.app.UiApp`)."""

from __future__ import annotations

import threading
from typing import Any

URL_PREFIX = "/cosell/ui"

#: Airflow 3's ``external_views`` entry: a "Co-sell" item in the navigation bar. With
#: ``url_route`` Airflow shows the page inside its own UI (an iframe at ``/plugin/cosell``).
EXTERNAL_VIEW = {
    "name": "Co-sell",
    "href": URL_PREFIX + "/",
    "destination": "nav",
    "url_route": "cosell",
    "category": None,
    "icon": None,
}


class UiApp:
    """An ASGI app that builds :func:`cosell_sync.ui.app.create_app` on its first request
    (what the plugin mounts), so processes that only load the plugin import no FastAPI and
    touch no DB."""

    def __init__(self, store_factory: Any = None) -> None:
        self._factory = store_factory
        self._app: Any = None
        self._lock = threading.Lock()

    @property
    def app(self) -> Any:
        with self._lock:
            if self._app is None:
                from cosell_sync.ui.app import create_app

                self._app = create_app(self._factory)
            return self._app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


class CosellMount:
    """One ASGI app for the plugin's ``/cosell`` prefix: ``/cosell/ui...`` goes to the Co-sell
    page (``ui``), everything else to ``other`` (the webhook receiver), as it was.

    Airflow mounts each plugin app with Starlette's ``Mount``, which matches by prefix in
    order, so a separate ``/cosell/ui`` mount would be shadowed by ``/cosell`` (or would have
    to come first). Dispatching here keeps the receiver the plugin's one ``/cosell`` app."""

    def __init__(self, ui: Any, other: Any, sub: str = "/ui") -> None:
        self.ui = ui
        self.other = other
        self.sub = sub

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope.get("type") in ("http", "websocket"):
            path, root = scope.get("path", ""), scope.get("root_path", "")
            route = path[len(root) :] if root and path.startswith(root) else path
            if route == self.sub or route.startswith(self.sub + "/"):
                await self.ui({**scope, "root_path": root + self.sub}, receive, send)
                return
        await self.other(scope, receive, send)
