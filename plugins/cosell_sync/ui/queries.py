"""What the Co-sell page shows, read from the state DB: pure SQLAlchemy Core over the store's
engine and tables, no Airflow imports, so it is tested without any Airflow component.

Every list is paged (``PAGE_SIZE`` rows, one more fetched to know whether a next page exists,
never a ``COUNT(*)`` over the whole table) and filtered on indexed columns:

* links: the primary key ``(crm, referral_id)`` and ``ux_cosell_links_crm_crm_id``; the
  customer-name search is a ``LIKE`` over the link's base (unindexed: a scan of one CRM's links);
* the deal timeline: ``ix_cosell_audit_crm_referral``;
* conflicts: ``ix_cosell_audit_at`` walked newest first (an index on ``(action, at)`` would
  serve it directly; see the report of issue 15);
* the dead letter: its primary key ``(crm, direction, record_key)``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from cosell_sync.crms import CRMS
from cosell_sync.state import DIRECTIONS
from cosell_sync.state.schema import audit_t, dead_letter_t, inbox_t, links_t, runs_t

PAGE_SIZE = 50
MAX_PAGE = 10_000
DISMISS_RUN_ID = "cosell-ui"  # the audit row of a dismissal names no DAG run: this says where it came from
DISMISS_ACTION = "dismiss"  # the detail says who dismissed the row, when, and its last error
SEARCH_MAX = 200


def sync_dag_id(crm: str) -> str:
    return f"cosell_sync_{crm}"


@dataclass
class Page:
    rows: list[dict[str, Any]]
    page: int
    size: int
    has_next: bool
    extra: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:  # the extras (crm, q, link, ...) read as attributes in templates
        extra = self.__dict__.get("extra", {})
        if name in extra:
            return extra[name]
        raise AttributeError(name)

    def as_json(self) -> dict[str, Any]:
        return {"page": self.page, "size": self.size, "has_next": self.has_next, "rows": self.rows, **self.extra}


def _page(rows: Sequence[Mapping[str, Any]], page: int, size: int) -> Page:
    items = [dict(r) for r in rows]
    return Page(items[:size], page, size, len(items) > size)


def clamp_page(page: Any) -> int:
    try:
        value = int(page)
    except (TypeError, ValueError):
        return 1
    return min(max(value, 1), MAX_PAGE)


def _as_utc(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _json(text: Any) -> Any:
    if text is None or not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def _check_crm(crm: str) -> str:
    if crm not in CRMS:
        raise ValueError(f"unknown CRM {crm!r}")
    return crm


def _by_code_point(engine: Engine, column: Any) -> Any:
    return column.collate("C") if engine.dialect.name == "postgresql" else column


def _read(engine: Engine, work: Any) -> Any:
    with engine.connect() as conn:
        conn.execution_options(cosell_read_only=True)
        with conn.begin():
            return work(conn)


# ------------------------------------------------------------------------------ overview


def overview(engine: Engine, crms: Iterable[str], *, max_attempts: int = 5) -> dict[str, Any]:
    """Per CRM: the last recorded run (summary), link count, dead-letter counts per direction
    (and how many are exhausted), conflicts in the audit; and the inbox's pending events."""
    crm_list = [_check_crm(c) for c in crms]

    def work(conn: Connection) -> dict[str, Any]:
        out: dict[str, Any] = {"crms": {}}
        for crm in crm_list:
            dag_id = sync_dag_id(crm)
            last = conn.execute(
                sa.select(runs_t)
                .where(runs_t.c.dag_id == dag_id)
                .order_by(runs_t.c.finished_at.desc(), _by_code_point(engine, runs_t.c.run_id).desc())
                .limit(1)
            ).first()
            last_real = conn.execute(  # the newest run that wrote (not a dry run): the last sync
                sa.select(runs_t.c.run_id, runs_t.c.finished_at, runs_t.c.summary)
                .where(runs_t.c.dag_id == dag_id)
                .order_by(runs_t.c.finished_at.desc())
                .limit(20)
            ).all()
            last_sync = next(
                (r for r in last_real if not (isinstance(_json(r.summary), dict) and _json(r.summary).get("dry_run"))),
                None,
            )
            links = conn.execute(sa.select(sa.func.count()).select_from(links_t).where(links_t.c.crm == crm)).scalar()
            dead = {d: {"total": 0, "exhausted": 0} for d in sorted(DIRECTIONS)}
            t = dead_letter_t
            for row in conn.execute(
                sa.select(
                    t.c.direction,
                    sa.func.count(),
                    sa.func.sum(sa.case((t.c.attempts >= max_attempts, 1), else_=0)),
                )
                .where(t.c.crm == crm)
                .group_by(t.c.direction)
            ):
                dead[row[0]] = {"total": int(row[1]), "exhausted": int(row[2] or 0)}
            conflicts = conn.execute(
                sa.select(sa.func.count())
                .select_from(audit_t)
                .where(audit_t.c.crm == crm, audit_t.c.action == "conflict")
            ).scalar()
            summary = _json(last.summary) if last is not None else None
            out["crms"][crm] = {
                "dag_id": dag_id,
                "last_run": None
                if last is None
                else {"run_id": last.run_id, "finished_at": _as_utc(last.finished_at), "summary": summary},
                "last_sync_at": None if last_sync is None else _as_utc(last_sync.finished_at),
                "last_sync_run_id": None if last_sync is None else last_sync.run_id,
                "directions": direction_counts(summary),
                "links": int(links or 0),
                "dead_letter": dead,
                "conflicts": int(conflicts or 0),
            }
        pending, newest = conn.execute(
            sa.select(sa.func.count(), sa.func.max(inbox_t.c.received_at)).where(inbox_t.c.status == "pending")
        ).one()
        out["inbox"] = {"pending": int(pending or 0), "newest_pending_at": _as_utc(newest)}
        return out

    return _read(engine, work)


def direction_counts(summary: Any) -> dict[str, dict[str, int]]:
    """created/updated/conflicts/failed per direction from a run's summary (zeros when absent)."""
    keys = ("created", "updated", "conflicts", "failed")
    out: dict[str, dict[str, int]] = {}
    for direction in ("pc_to_crm", "crm_to_pc"):
        counts = summary.get(direction) if isinstance(summary, dict) else None
        counts = counts if isinstance(counts, dict) else {}
        out[direction] = {k: int(counts.get(k) or 0) for k in keys}
    return out


# ------------------------------------------------------------------------------ links


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def links_page(engine: Engine, crm: str, *, q: str = "", page: int = 1, size: int = PAGE_SIZE) -> Page:
    """One page of ``crm``'s links, ordered by referral id; ``q`` matches a referral id or CRM
    id exactly, or any text of the link's record (the customer name among it), case-insensitively.
    Each row has its sync status: ``failing`` when the dead letter holds the record (either
    direction), else ``synced``."""
    _check_crm(crm)
    page = clamp_page(page)
    q = (q or "").strip()[:SEARCH_MAX]
    c = links_t.c
    query = sa.select(c.referral_id, c.crm_id, c.base, c.synced_at, c.run_id).where(c.crm == crm)
    if q:
        pattern = f"%{_like_escape(q.lower())}%"
        query = query.where(
            sa.or_(
                c.referral_id == q,
                c.crm_id == q,
                sa.func.lower(sa.type_coerce(c.base, sa.Text)).like(pattern, escape="\\"),
            )
        )
    query = query.order_by(_by_code_point(engine, c.referral_id)).limit(size + 1).offset((page - 1) * size)

    def work(conn: Connection) -> Page:
        rows = []
        for r in conn.execute(query):
            base = _json(r.base) if not isinstance(r.base, dict) else r.base
            base = base if isinstance(base, dict) else {}
            rows.append(
                {
                    "crm": crm,
                    "referral_id": r.referral_id,
                    "crm_id": r.crm_id,
                    "name": base.get("name"),
                    "customer_name": base.get("customer_name"),
                    "synced_at": _as_utc(r.synced_at),
                    "run_id": r.run_id,
                }
            )
        result = _page(rows, page, size)
        _attach_status(conn, crm, result.rows)
        return result

    result = _read(engine, work)
    result.extra["q"] = q
    result.extra["crm"] = crm
    return result


def _attach_status(conn: Connection, crm: str, rows: list[dict[str, Any]]) -> None:
    t = dead_letter_t
    refs = [r["referral_id"] for r in rows]
    ids = [r["crm_id"] for r in rows]
    failing: dict[tuple[str, str], dict[str, Any]] = {}
    if rows:
        query = sa.select(t.c.direction, t.c.record_key, t.c.attempts, t.c.last_error).where(
            t.c.crm == crm,
            sa.or_(
                sa.and_(t.c.direction == "pc_to_crm", t.c.record_key.in_(refs)),
                sa.and_(t.c.direction == "crm_to_pc", t.c.record_key.in_(ids)),
            ),
        )
        for f in conn.execute(query):
            failing[(f.direction, f.record_key)] = {"attempts": f.attempts, "error": f.last_error}
    for row in rows:
        problems = [
            {"direction": d, **failing[(d, key)]}
            for d, key in (("pc_to_crm", row["referral_id"]), ("crm_to_pc", row["crm_id"]))
            if (d, key) in failing
        ]
        row["status"] = "failing" if problems else "synced"
        row["failures"] = problems


# ------------------------------------------------------------------------------ dead letter


def field_of_failure(payload: Any, error: str | None) -> str:
    """The field(s) a dead-letter row is about: the fields the failed write carried, else the
    ``field: message`` prefixes of a validation error."""
    if isinstance(payload, dict) and isinstance(payload.get("fields"), dict) and payload["fields"]:
        return ", ".join(sorted(str(k) for k in payload["fields"]))
    found = re.findall(r"(?:^|; )([A-Za-z_][\w.]*): ", error or "")
    return ", ".join(dict.fromkeys(found))


def retry_referral_id(crm_row: Mapping[str, Any]) -> str | None:
    """The referral a dead-letter row's retry syncs: its payload's, or its key for pc_to_crm."""
    payload = crm_row.get("payload") if isinstance(crm_row.get("payload"), dict) else {}
    ref = payload.get("referral_id")
    if ref not in (None, "") and not (isinstance(ref, float) and ref != ref):
        return str(ref)
    if crm_row.get("direction") == "pc_to_crm":
        return str(crm_row.get("record_key"))
    return None


def dead_letter_page(
    engine: Engine, crms: Iterable[str], *, page: int = 1, size: int = PAGE_SIZE, max_attempts: int = 5
) -> Page:
    crm_list = [_check_crm(c) for c in crms]
    page = clamp_page(page)
    t = dead_letter_t
    query = (
        sa.select(t)
        .where(t.c.crm.in_(crm_list))
        .order_by(
            _by_code_point(engine, t.c.crm),
            _by_code_point(engine, t.c.direction),
            t.c.first_seen,
            _by_code_point(engine, t.c.record_key),
        )
        .limit(size + 1)
        .offset((page - 1) * size)
    )

    def work(conn: Connection) -> list[dict[str, Any]]:
        rows = []
        for r in conn.execute(query) if crm_list else []:
            payload = r.payload if isinstance(r.payload, dict) else _json(r.payload)
            payload = payload if isinstance(payload, dict) else {}
            row = {
                "crm": r.crm,
                "direction": r.direction,
                "record_key": r.record_key,
                "payload": payload,
                "attempts": int(r.attempts),
                "first_seen": _as_utc(r.first_seen),
                "last_seen": _as_utc(r.last_seen),
                "error": r.last_error,
                "error_code": r.error_code,
                "last_run_id": r.last_run_id,
                "exhausted": int(r.attempts) >= max_attempts,
            }
            row["field"] = field_of_failure(payload, r.last_error)
            row["referral_id"] = retry_referral_id(row)
            row["crm_id"] = payload.get("crm_id") or (r.record_key if r.direction == "crm_to_pc" else None)
            rows.append(row)
        return rows

    return _page(_read(engine, work), page, size)


def dead_letter_rows(engine: Engine, crm: str, keys: Iterable[tuple[str, str]]) -> list[dict[str, Any]]:
    """The dead-letter rows of ``crm`` named by (direction, record_key)."""
    _check_crm(crm)
    wanted = [(d, k) for d, k in keys if d in DIRECTIONS]
    if not wanted:
        return []
    t = dead_letter_t

    def work(conn: Connection) -> list[dict[str, Any]]:
        found = []
        for direction, key in wanted:
            r = conn.execute(
                sa.select(t).where(t.c.crm == crm, t.c.direction == direction, t.c.record_key == key)
            ).first()
            if r is not None:
                payload = r.payload if isinstance(r.payload, dict) else _json(r.payload)
                found.append(
                    {
                        "crm": r.crm,
                        "direction": r.direction,
                        "record_key": r.record_key,
                        "payload": payload if isinstance(payload, dict) else {},
                        "attempts": int(r.attempts),
                        "error": r.last_error,
                    }
                )
        return found

    return _read(engine, work)


def dismiss(
    engine: Engine, crm: str, direction: str, record_key: str, *, user: str, now: datetime | None = None
) -> bool:
    """Remove one row from the dead letter and say so in the audit (who, when, what the error
    was), in one transaction. Returns False when the row was not there (nothing is written)."""
    _check_crm(crm)
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}")
    now = now or datetime.now(UTC)
    t = dead_letter_t

    def work(conn: Connection) -> bool:
        row = conn.execute(
            sa.select(t).where(t.c.crm == crm, t.c.direction == direction, t.c.record_key == record_key)
        ).first()
        if row is None:
            return False
        conn.execute(t.delete().where(t.c.crm == crm, t.c.direction == direction, t.c.record_key == record_key))
        payload = row.payload if isinstance(row.payload, dict) else _json(row.payload)
        payload = payload if isinstance(payload, dict) else {}
        referral_id = retry_referral_id({"payload": payload, "direction": direction, "record_key": record_key})
        crm_id = payload.get("crm_id") or (record_key if direction == "crm_to_pc" else None)
        detail = (
            f"dismissed from the dead letter by {user} at {now.isoformat()} "
            f"(after {row.attempts} attempt{'' if row.attempts == 1 else 's'}; last error: {row.last_error})"
        )
        conn.execute(
            audit_t.insert().values(
                at=now,
                dag_id=sync_dag_id(crm),
                run_id=DISMISS_RUN_ID,
                crm=crm,
                direction=direction,
                referral_id=None if referral_id is None else str(referral_id)[:256],
                crm_id=None if crm_id in (None, "") else str(crm_id),
                action=DISMISS_ACTION,
                field="dead_letter",
                old_value=None,
                new_value=None,
                detail=detail[:4000],
            )
        )
        return True

    with engine.connect() as conn, conn.begin():
        return work(conn)


# ------------------------------------------------------------------------------ conflicts and timeline

_CONFLICT = re.compile(r"partner_center=(?P<pc>.*) crm=(?P<crm>.*); (?P<winner>partner_center|crm) wins", re.S)


def parse_conflict(detail: str | None, direction: str | None = None) -> dict[str, Any]:
    """The two values and the winner of a conflict's audit detail
    (``partner_center=<repr> crm=<repr>; <winner> wins``)."""
    m = _CONFLICT.fullmatch(detail or "")
    if m is None:
        winner = {"pc_to_crm": "partner_center", "crm_to_pc": "crm"}.get(direction or "")
        return {"partner_center_value": None, "crm_value": None, "winner": winner}
    return {"partner_center_value": m["pc"], "crm_value": m["crm"], "winner": m["winner"]}


def _audit_row(r: Any) -> dict[str, Any]:
    return {
        "id": int(r.id),
        "at": _as_utc(r.at),
        "dag_id": r.dag_id,
        "run_id": r.run_id,
        "crm": r.crm,
        "direction": r.direction,
        "referral_id": r.referral_id,
        "crm_id": r.crm_id,
        "action": r.action,
        "field": r.field,
        "old_value": _json(r.old_value),
        "new_value": _json(r.new_value),
        "detail": r.detail,
    }


def conflicts_page(engine: Engine, crms: Iterable[str], *, page: int = 1, size: int = PAGE_SIZE) -> Page:
    """Conflicts settled by the sync, newest first: field, base, both values, winner, chosen value."""
    crm_list = [_check_crm(c) for c in crms]
    page = clamp_page(page)
    c = audit_t.c
    query = (
        sa.select(audit_t)
        .where(c.action == "conflict", c.crm.in_(crm_list))
        .order_by(c.at.desc(), c.id.desc())
        .limit(size + 1)
        .offset((page - 1) * size)
    )

    def work(conn: Connection) -> list[dict[str, Any]]:
        rows = []
        for r in conn.execute(query) if crm_list else []:
            row = _audit_row(r)
            row["base"] = row["old_value"]
            row["chosen"] = row["new_value"]
            row.update(parse_conflict(r.detail, r.direction))
            rows.append(row)
        return rows

    return _page(_read(engine, work), page, size)


def timeline_page(
    engine: Engine,
    crm: str,
    *,
    referral_id: str | None = None,
    crm_id: str | None = None,
    page: int = 1,
    size: int = PAGE_SIZE,
) -> Page:
    """Every audit row of one pair (by referral id, else by CRM id), newest first."""
    _check_crm(crm)
    page = clamp_page(page)
    c = audit_t.c
    if referral_id:
        where = c.referral_id == referral_id
    elif crm_id:
        where = c.crm_id == crm_id
    else:
        raise ValueError("a timeline needs a referral id or a CRM id")
    query = (
        sa.select(audit_t)
        .where(c.crm == crm, where)
        .order_by(c.at.desc(), c.id.desc())
        .limit(size + 1)
        .offset((page - 1) * size)
    )

    def work(conn: Connection) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        rows = [_audit_row(r) for r in conn.execute(query)]
        link_where = links_t.c.referral_id == referral_id if referral_id else links_t.c.crm_id == crm_id
        link = conn.execute(
            sa.select(links_t.c.referral_id, links_t.c.crm_id, links_t.c.synced_at).where(
                links_t.c.crm == crm, link_where
            )
        ).first()
        return rows, None if link is None else {
            "referral_id": link.referral_id,
            "crm_id": link.crm_id,
            "synced_at": _as_utc(link.synced_at),
        }

    rows, link = _read(engine, work)
    result = _page(rows, page, size)
    result.extra.update({"crm": crm, "referral_id": referral_id, "crm_id": crm_id, "link": link})
    return result


def run_summary(engine: Engine, dag_id: str, run_id: str) -> dict[str, Any] | None:
    """A recorded run (the runs table) with its summary, or None."""
    query = sa.select(runs_t).where(runs_t.c.dag_id == dag_id, runs_t.c.run_id == run_id)
    row = _read(engine, lambda conn: conn.execute(query).first())
    if row is None:
        return None
    return {
        "dag_id": row.dag_id,
        "run_id": row.run_id,
        "crm": row.crm,
        "summary": _json(row.summary) if not isinstance(row.summary, dict) else row.summary,
        "finished_at": _as_utc(row.finished_at),
    }
