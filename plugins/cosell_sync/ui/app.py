"""The Co-sell page: a FastAPI app the plugin mounts on Airflow's API server at ``/cosell/ui``.

Every route is behind Airflow's own authentication, through the API server's dependencies
(:func:`airflow.api_fastapi.core_api.security.get_user` reads the JWT from the
``Authorization: Bearer`` header or the ``_token`` cookie the UI sets;
:func:`~airflow.api_fastapi.core_api.security.requires_access_dag` asks the auth manager):

* no or a bad token: 401 (``/api/...``) or a redirect to Airflow's login page (HTML pages);
* reading needs read access to a cosell sync DAG (``cosell_sync_<crm>``); a user sees the
  CRMs whose DAG they may read, and gets 403 when that is none;
* Retry now and Dismiss need permission to run that DAG (``POST`` on its DAG runs). The
  HTML forms carry a CSRF token (an HMAC of the user's id under the API server's secret
  key) and a cross-origin ``Origin`` is refused; the UI's cookie is ``SameSite=Lax`` too.
  The JSON API takes JSON bodies only (a cross-site form cannot send one).

Retry now triggers ``cosell_sync_<crm>`` with ``{"referral_ids": [...]}`` through Airflow's
own :func:`airflow.api.common.trigger_dag.trigger_dag`, as the calling user; Dismiss removes
the row and writes an audit row naming who dismissed it and when.

The same data is served as JSON under ``/cosell/ui/api/...``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from collections.abc import Callable
from typing import Annotated, Any
from urllib.parse import urlsplit

from airflow.api_fastapi.core_api.security import GetUserDep
from fastapi import Depends, FastAPI, HTTPException, Query, Request, status
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from cosell_sync.crms import CRMS
from cosell_sync.state import DIRECTIONS, StateStore
from cosell_sync.ui import queries
from cosell_sync.ui.render import Links, render, render_index

log = logging.getLogger(__name__)

URL_PREFIX = "/cosell/ui"
EXTRA_DAGS = ("cosell_referral_events",)
# the connections to find each CRM's host in, the first that exists (then the deprecated id)
CONNECTIONS = {crm.name: crm.conn_ids for crm in CRMS.values()}  # the CRMs' connection ids, newest first
HOSTS_TTL = 60.0
MAX_ITEMS = 500


# ------------------------------------------------------------------------------ auth


def _security() -> Any:
    from airflow.api_fastapi.core_api import security

    return security


# The caller, as Airflow's API server authenticates it (Bearer header, else the ``_token`` cookie)
UserDep = GetUserDep


def _allowed(request: Request, user: Any, dag_id: str, method: str, run: bool = False) -> bool:
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity

    check = _security().requires_access_dag(method, DagAccessEntity.RUN if run else None, param_dag_id=dag_id)
    try:
        check(request, user)
    except HTTPException as exc:
        if exc.status_code == status.HTTP_403_FORBIDDEN:
            return False
        raise
    return True


def readable_crms(request: Request, user: Any) -> list[str]:
    """The CRMs whose sync DAG ``user`` may read; 403 when none."""
    crms = [crm for crm in sorted(CRMS) if _allowed(request, user, queries.sync_dag_id(crm), "GET")]
    if not crms:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "Forbidden: no read access to a cosell DAG")
    return crms


def runnable_crms(request: Request, user: Any) -> list[str]:
    return [crm for crm in sorted(CRMS) if _allowed(request, user, queries.sync_dag_id(crm), "POST", run=True)]


def _user_name(user: Any) -> str:
    for attr in ("get_name", "get_id"):
        try:
            value = getattr(user, attr)()
        except Exception:  # noqa: S112 - an auth manager's user may lack either
            continue
        if value:
            return str(value)
    return "unknown user"


def _csrf_key() -> bytes:
    from airflow.api_fastapi.auth.tokens import get_signing_key

    return get_signing_key("api", "secret_key").encode()


def csrf_token(user: Any, key: bytes | None = None) -> str:
    """A form token bound to the user (their id) under the API server's secret key."""
    ident = f"cosell-ui-csrf:{_user_id(user)}".encode()
    return hmac.new(key if key is not None else _csrf_key(), ident, hashlib.sha256).hexdigest()


def _user_id(user: Any) -> str:
    try:
        return str(user.get_id())
    except Exception:
        return _user_name(user)


def check_form_origin(request: Request) -> None:
    origin = request.headers.get("origin")
    if origin and origin != "null":
        host = request.headers.get("host", "")
        if urlsplit(origin).netloc.lower() != host.lower():
            raise HTTPException(status.HTTP_403_FORBIDDEN, "Cross-origin form refused")
    elif origin == "null":
        raise HTTPException(status.HTTP_403_FORBIDDEN, "Cross-origin form refused")


def check_dag(dag_id: str) -> str:
    crm = dag_id.removeprefix("cosell_sync_")
    if not dag_id.startswith("cosell_sync_") or crm not in CRMS:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "Not a cosell sync DAG")
    return crm


# ------------------------------------------------------------------------------ Airflow side


def airflow_last_runs(dag_ids: list[str]) -> dict[str, dict[str, Any]]:
    """The newest DAG run of each DAG in Airflow's metadata DB: run id, state, end date."""
    try:
        from airflow.models.dagrun import DagRun
        from airflow.utils.session import create_session
        from sqlalchemy import select

        out: dict[str, dict[str, Any]] = {}
        with create_session() as session:
            for dag_id in dag_ids:
                row = session.execute(
                    select(DagRun.run_id, DagRun.state, DagRun.end_date)
                    .where(DagRun.dag_id == dag_id)
                    .order_by(DagRun.run_after.desc(), DagRun.id.desc())
                    .limit(1)
                ).first()
                if row is not None:
                    state = getattr(row.state, "value", row.state)
                    out[dag_id] = {"run_id": row.run_id, "state": str(state), "end_date": row.end_date}
        return out
    except Exception:
        log.warning("could not read the cosell DAG runs from Airflow's DB", exc_info=True)
        return {}


def trigger_retry(dag_id: str, referral_ids: list[str], user_name: str) -> str:
    """Trigger ``dag_id`` for ``referral_ids`` through Airflow's own trigger, as ``user_name``."""
    from airflow.api.common.trigger_dag import trigger_dag
    from airflow.utils.types import DagRunTriggeredByType

    conf: dict[str, Any] = {"referral_ids": sorted(set(referral_ids))} if referral_ids else {}
    what = f"{len(conf['referral_ids'])} referral(s)" if conf else "a window sync"
    run = trigger_dag(
        dag_id,
        triggered_by=DagRunTriggeredByType.UI,
        triggering_user_name=user_name,
        conf=conf,
        # a note the cosell listener recognises as its own, so the run's report replaces it
        note=f"**{dag_id}** · Retry now from the Co-sell page by {user_name}: {what}",
    )
    if run is None:
        raise RuntimeError(f"Airflow did not create a run of {dag_id}")
    return str(run.run_id)


# ------------------------------------------------------------------------------ the app


class _State:
    def __init__(self, store_factory: Callable[[], StateStore]) -> None:
        self._factory = store_factory
        self._store: StateStore | None = None
        self._lock = threading.Lock()
        self._hosts: tuple[float, dict[str, str | None]] | None = None

    def store(self) -> StateStore:
        with self._lock:
            if self._store is None:
                store = self._factory()
                store.migrate()
                self._store = store
            return self._store

    def crm_hosts(self) -> dict[str, str | None]:
        now = time.monotonic()
        if self._hosts is not None and now - self._hosts[0] < HOSTS_TTL:
            return self._hosts[1]
        hosts: dict[str, str | None] = {}
        for crm, conn_ids in CONNECTIONS.items():
            hosts[crm] = None
            for conn_id in conn_ids:
                try:
                    from airflow.models.connection import Connection

                    conn = Connection.get_connection_from_secrets(conn_id)
                except Exception:
                    log.debug("no %s connection for the Co-sell page's record links", conn_id, exc_info=True)
                    continue
                extra = conn.extra_dejson or {}
                host = extra.get("instance_url") or conn.host or ""
                host = host if "://" in host or not host else "https://" + host
                hosts[crm] = host.rstrip("/") or None
                break
        self._hosts = (now, hosts)
        return hosts

    def close(self) -> None:
        if self._store is not None:
            self._store.close()


def _links(request: Request, state: _State) -> Links:
    root = request.scope.get("root_path", "") or ""
    airflow_root = root[: -len(URL_PREFIX)] if root.endswith(URL_PREFIX) else ""
    query = {k: v for k, v in request.query_params.items() if k not in ("flash", "flash_kind")}
    return Links(root or URL_PREFIX, airflow_root, state.crm_hosts(), query)


def _decode_items(values: list[str]) -> list[tuple[str, str]]:
    items = []
    for value in values[:MAX_ITEMS]:
        direction, sep, key = str(value).partition(":")
        if not sep or direction not in DIRECTIONS or not key:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, "items are direction:record_key")
        items.append((direction, key))
    if not items:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "no dead-letter record named")
    return items


def create_app(store_factory: Callable[[], StateStore] | None = None) -> FastAPI:
    app = FastAPI(title="Co-sell", docs_url=None, redoc_url=None, openapi_url=None)
    state = _State(store_factory or StateStore.from_airflow)
    app.state.cosell = state

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        html = not request.url.path.startswith(f"{request.scope.get('root_path', '')}/api")
        if exc.status_code == status.HTTP_401_UNAUTHORIZED and html and request.method == "GET":
            from airflow.api_fastapi.app import get_auth_manager

            login = get_auth_manager().get_url_login(next_url=str(request.url))
            return RedirectResponse(login, status_code=status.HTTP_303_SEE_OTHER)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    def engine() -> Any:
        return state.store().engine

    def max_attempts() -> int:
        return state.store().max_attempts

    def overview_data(request: Request, crms: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
        from cosell_sync.pipeline import format_report

        data = queries.overview(engine(), crms, max_attempts=max_attempts())
        runs = airflow_last_runs([queries.sync_dag_id(c) for c in crms] + list(EXTRA_DAGS))
        for crm, o in data["crms"].items():
            o["airflow_run"] = runs.get(o["dag_id"])
            summary = (o["last_run"] or {}).get("summary")
            o["report"] = _report(format_report, o["dag_id"], summary, crm)
        extra = {d: runs[d] for d in EXTRA_DAGS if d in runs}
        return data, extra

    # ---------------------------------------------------------------- HTML

    @app.get("/", response_class=HTMLResponse)
    def index(
        request: Request,
        user: UserDep,
        crm: str | None = None,
        q: str = "",
        links_page: int = 1,
        dead_page: int = 1,
        conflicts_page: int = 1,
        flash: str | None = None,
        flash_kind: str = "ok",
    ) -> HTMLResponse:
        crms = readable_crms(request, user)
        data, extra = overview_data(request, crms)
        with_links = [c for c in crms if data["crms"][c]["links"]]  # by default, the first CRM with links
        link_crm = crm if crm in crms else (with_links or crms)[0]
        page = render_index(
            engine(),
            _links(request, state),
            crms=crms,
            overview=data,
            link_crm=link_crm,
            q=q,
            links_page=links_page,
            dead_page=dead_page,
            conflicts_page=conflicts_page,
            max_attempts=max_attempts(),
            user=_user_name(user),
            extra_runs=extra,
            actionable=set(runnable_crms(request, user)),
            csrf=csrf_token(user),
            flash={"kind": "error" if flash_kind == "error" else "ok", "text": flash[:500]} if flash else None,
        )
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    @app.get("/timeline", response_class=HTMLResponse)
    def timeline(
        request: Request,
        user: UserDep,
        crm: str,
        referral_id: str | None = None,
        crm_id: str | None = None,
        page: int = 1,
    ) -> HTMLResponse:
        if crm not in readable_crms(request, user):
            raise HTTPException(status.HTTP_403_FORBIDDEN, "Forbidden")
        if not referral_id and not crm_id:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, "referral_id or crm_id is required")
        t = queries.timeline_page(engine(), crm, referral_id=referral_id, crm_id=crm_id, page=page)
        return HTMLResponse(render("timeline.html", _links(request, state), user=_user_name(user), t=t))

    @app.get("/runs/{dag_id}/{run_id}", response_class=HTMLResponse)
    def run_report(request: Request, user: UserDep, dag_id: str, run_id: str) -> HTMLResponse:
        from cosell_sync.pipeline import format_report

        crm = check_dag(dag_id)
        if crm not in readable_crms(request, user):
            raise HTTPException(status.HTTP_403_FORBIDDEN, "Forbidden")
        run = queries.run_summary(engine(), dag_id, run_id)
        report = _report(format_report, dag_id, (run or {}).get("summary"), crm)
        return HTMLResponse(render("run.html", _links(request, state), user=_user_name(user), run=run, report=report))

    def _action_redirect(request: Request, text: str, kind: str = "ok") -> RedirectResponse:
        from urllib.parse import urlencode

        root = request.scope.get("root_path", "") or URL_PREFIX
        target = f"{root}/?" + urlencode({"flash": text, "flash_kind": kind}) + "#dead-letter"
        return RedirectResponse(target, status_code=status.HTTP_303_SEE_OTHER)

    async def _form(request: Request, user: Any) -> list[tuple[str, str]]:
        check_form_origin(request)
        form = await request.form()
        token = str(form.get("csrf") or "")
        if not hmac.compare_digest(token, csrf_token(user)):
            raise HTTPException(status.HTTP_403_FORBIDDEN, "The form has expired: reload the page")
        return _decode_items([str(v) for v in form.getlist("item")])

    def _run_dep() -> Any:
        from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity

        return Depends(_security().requires_access_dag("POST", DagAccessEntity.RUN))

    def _retry(crm: str, dag_id: str, items: list[tuple[str, str]], user: Any) -> dict[str, Any]:
        rows = queries.dead_letter_rows(engine(), crm, items)
        if not rows:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "No such dead-letter record")
        refs = [r for r in (queries.retry_referral_id(row) for row in rows) if r]
        whole = len(refs) < len(rows)  # a CRM record with no referral yet: only a window run retries it
        run_id = trigger_retry(dag_id, [] if whole else refs, _user_name(user))
        log.info(
            "Co-sell page: %s triggered %s run %s for %d dead-letter record(s)",
            _user_name(user),
            dag_id,
            run_id,
            len(rows),
        )
        return {"dag_id": dag_id, "run_id": run_id, "referral_ids": [] if whole else sorted(set(refs))}

    def _dismiss(crm: str, items: list[tuple[str, str]], user: Any) -> dict[str, Any]:
        done = [
            {"direction": d, "record_key": k}
            for d, k in items
            if queries.dismiss(engine(), crm, d, k, user=_user_name(user))
        ]
        log.info("Co-sell page: %s dismissed %d dead-letter record(s) of %s", _user_name(user), len(done), crm)
        return {"dismissed": done}

    @app.post("/dead-letter/{dag_id}/retry", dependencies=[_run_dep()])
    async def retry_form(request: Request, user: UserDep, dag_id: str) -> RedirectResponse:
        crm = check_dag(dag_id)
        items = await _form(request, user)
        try:
            from starlette.concurrency import run_in_threadpool

            result = await run_in_threadpool(_retry, crm, dag_id, items, user)
        except HTTPException:
            raise
        except Exception as exc:
            log.exception("Retry now failed for %s", dag_id)
            return _action_redirect(request, f"Retry now failed: {type(exc).__name__}: {exc}", "error")
        return _action_redirect(request, f"Triggered {dag_id} run {result['run_id']}")

    @app.post("/dead-letter/{dag_id}/dismiss", dependencies=[_run_dep()])
    async def dismiss_form(request: Request, user: UserDep, dag_id: str) -> RedirectResponse:
        from starlette.concurrency import run_in_threadpool

        crm = check_dag(dag_id)
        items = await _form(request, user)
        result = await run_in_threadpool(_dismiss, crm, items, user)
        return _action_redirect(request, f"Dismissed {len(result['dismissed'])} record(s) from the dead letter")

    # ---------------------------------------------------------------- JSON

    @app.get("/api/overview")
    def api_overview(request: Request, user: UserDep) -> dict[str, Any]:
        data, extra = overview_data(request, readable_crms(request, user))
        return {**data, "other_dags": extra}

    @app.get("/api/links")
    def api_links(
        request: Request, user: UserDep, crm: str, q: str = "", page: Annotated[int, Query(ge=1)] = 1
    ) -> dict[str, Any]:
        if crm not in readable_crms(request, user):
            raise HTTPException(status.HTTP_403_FORBIDDEN, "Forbidden")
        return queries.links_page(engine(), crm, q=q, page=page).as_json()

    @app.get("/api/dead-letter")
    def api_dead_letter(request: Request, user: UserDep, page: Annotated[int, Query(ge=1)] = 1) -> dict[str, Any]:
        crms = readable_crms(request, user)
        return queries.dead_letter_page(engine(), crms, page=page, max_attempts=max_attempts()).as_json()

    @app.get("/api/conflicts")
    def api_conflicts(request: Request, user: UserDep, page: Annotated[int, Query(ge=1)] = 1) -> dict[str, Any]:
        return queries.conflicts_page(engine(), readable_crms(request, user), page=page).as_json()

    @app.get("/api/timeline")
    def api_timeline(
        request: Request,
        user: UserDep,
        crm: str,
        referral_id: str | None = None,
        crm_id: str | None = None,
        page: Annotated[int, Query(ge=1)] = 1,
    ) -> dict[str, Any]:
        if crm not in readable_crms(request, user):
            raise HTTPException(status.HTTP_403_FORBIDDEN, "Forbidden")
        if not referral_id and not crm_id:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, "referral_id or crm_id is required")
        return queries.timeline_page(engine(), crm, referral_id=referral_id, crm_id=crm_id, page=page).as_json()

    async def _json_items(request: Request) -> list[tuple[str, str]]:
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, "JSON body required")
        try:
            body = await request.json()
            items = body["items"]
            return _decode_items([f"{i['direction']}:{i['record_key']}" for i in items])
        except HTTPException:
            raise
        except Exception:
            raise HTTPException(
                status.HTTP_400_BAD_REQUEST, 'body: {"items": [{"direction": ..., "record_key": ...}]}'
            ) from None

    @app.post("/api/dead-letter/{dag_id}/retry", dependencies=[_run_dep()])
    async def api_retry(request: Request, user: UserDep, dag_id: str) -> dict[str, Any]:
        from starlette.concurrency import run_in_threadpool

        crm = check_dag(dag_id)
        items = await _json_items(request)
        return await run_in_threadpool(_retry, crm, dag_id, items, user)

    @app.post("/api/dead-letter/{dag_id}/dismiss", dependencies=[_run_dep()])
    async def api_dismiss(request: Request, user: UserDep, dag_id: str) -> dict[str, Any]:
        from starlette.concurrency import run_in_threadpool

        crm = check_dag(dag_id)
        items = await _json_items(request)
        return await run_in_threadpool(_dismiss, crm, items, user)

    return app


def _report(format_report: Callable[..., str], dag_id: str, summary: Any, crm: str) -> str | None:
    if not isinstance(summary, dict):
        return None
    try:
        return format_report(dag_id, summary, crm)
    except Exception:  # a summary of an older shape: show it raw
        import json

        return json.dumps(summary, indent=2, default=str)
