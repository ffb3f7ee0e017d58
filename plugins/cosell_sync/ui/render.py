"""The Co-sell page's HTML: Jinja2 templates rendered on the server, every value escaped
(``autoescape`` on; nothing is marked safe), plain CSS, no JavaScript (Dismiss asks for no
confirm() dialog: the row is kept in the audit). Pure functions of the data :mod:`cosell_sync.ui.queries` returns."""

from __future__ import annotations

import functools
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import jinja2

from cosell_sync.crms import CRMS

CRM_LABELS = {crm.name: crm.label for crm in CRMS.values()}
DIRECTION_LABELS = {"pc_to_crm": "Partner Center → CRM", "crm_to_pc": "CRM → Partner Center"}
REFERRAL_URL = "https://partner.microsoft.com/dashboard/referrals/v2/leads/{referral_id}"
# A CRM record's page, from the connection's host (Dataverse) or instance_url (Salesforce)
CRM_RECORD_PATHS = {crm.name: crm.record_path for crm in CRMS.values()}


TEMPLATES = Path(__file__).with_name("templates")


@functools.cache
def _css() -> str:
    return (TEMPLATES / "style.css").read_text()


def _tojson_text(value: Any) -> str:
    import json

    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)


@functools.cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["urlpath"] = lambda v: quote(str(v), safe="")
    env.filters["tojson_text"] = _tojson_text
    return env


def ago(when: datetime, now: datetime | None = None) -> str:
    seconds = max(0, int(((now or datetime.now(UTC)) - when).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


class Links:
    """Builds the URLs a page links to: the page's own (``ui``: its mount path), Airflow's
    (``airflow``: the API server's root path), Partner Center's and the CRMs' record pages."""

    def __init__(self, ui: str, airflow: str, crm_hosts: dict[str, str | None], query: dict[str, str] | None = None):
        self.ui = ui.rstrip("/")
        self.airflow = airflow.rstrip("/")
        self.crm_hosts = crm_hosts
        self.query = dict(query or {})

    def referral_url(self, referral_id: str) -> str:
        return REFERRAL_URL.format(referral_id=quote(str(referral_id), safe=""))

    def record_url(self, crm: str, crm_id: str) -> str | None:
        host = (self.crm_hosts.get(crm) or "").rstrip("/")
        if not host.startswith(("https://", "http://")) or crm not in CRM_RECORD_PATHS:
            return None
        return host + CRM_RECORD_PATHS[crm].format(crm_id=quote(str(crm_id), safe=""))

    def timeline_url(self, crm: str, referral_id: str) -> str:
        return f"{self.ui}/timeline?" + urlencode({"crm": crm, "referral_id": referral_id})

    def page_url(self, name: str, page: int) -> str:
        return "?" + urlencode({**self.query, name: str(page)})

    def helpers(self) -> dict[str, Any]:
        return {
            "ui": self.ui,
            "airflow": self.airflow,
            "referral_url": self.referral_url,
            "record_url": self.record_url,
            "timeline_url": self.timeline_url,
            "page_url": self.page_url,
            "crm_label": lambda crm: CRM_LABELS.get(crm, crm),
            "direction_label": lambda d: DIRECTION_LABELS.get(d, d),
            "winner_label": lambda w, crm: {"partner_center": "Partner Center", "crm": CRM_LABELS.get(crm, crm)}.get(
                w or "", w or "?"
            ),
            "dag_for": lambda crm: f"cosell_sync_{crm}",
            "ago": ago,
            "css": _css(),
        }


def render(template: str, urls: Links, **context: Any) -> str:
    context.setdefault("flash", None)
    context.setdefault("csrf", "")
    context.setdefault("user", "")
    return environment().get_template(template).render(**urls.helpers(), **context)


def render_index(
    engine: Any,
    urls: Links,
    *,
    crms: list[str],
    overview: dict[str, Any],
    link_crm: str,
    q: str = "",
    links_page: int = 1,
    dead_page: int = 1,
    conflicts_page: int = 1,
    max_attempts: int = 5,
    **context: Any,
) -> str:
    """The Co-sell page: the overview it is given (with what Airflow's DB says of each CRM's
    last run), one CRM's links (searched by ``q``), the dead letter and the conflicts of
    ``crms``, each at its page; ``context`` carries the rest (user, extra_runs, actionable,
    csrf, flash)."""
    from cosell_sync.ui import queries

    return render(
        "index.html",
        urls,
        crms=crms,
        overview=overview,
        links=queries.links_page(engine, link_crm, q=q, page=links_page),
        dead=queries.dead_letter_page(engine, crms, page=dead_page, max_attempts=max_attempts),
        conflicts=queries.conflicts_page(engine, crms, page=conflicts_page),
        **context,
    )
