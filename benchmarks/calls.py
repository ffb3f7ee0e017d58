"""The API calls of a throughput run (benchmarks/throughput.py): each request the emulators served,
classified per system as read, write or token, with its kind and records, and the floor: the fewest
calls that could have done the same work (SPEC §10; the rules are in throughput's docstring)."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

SF_COLLECTION = 200  # records per sObject Collections call
SF_BULK_ABOVE = 2000  # above this many records a write kind is one Bulk API 2.0 job
BULK_JOB_CALLS = 6  # create job, upload, close, one status poll, successful and failed results
SF_QUERY_PAGE = 2000
DV_BATCH = 1000  # requests per $batch, targets per *Multiple
DV_PAGE = 5000
PC_PAGE = 100


# -- classifying requests ---------------------------------------------------------------------------
def _query(target: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(target).query, keep_blank_values=True)


def _json(entry: Any) -> Any:
    try:
        return json.loads(entry.body) if entry.body else None
    except (ValueError, UnicodeDecodeError):
        return None


def classify_entra(entry: Any) -> tuple[str, str, int]:
    if entry.path.endswith("/token"):
        return "token", "token grant", 0
    return "token", "token: " + ("openid discovery" if "openid" in entry.path else entry.path), 0


def classify_partner_center(entry: Any) -> tuple[str, str, int]:
    """(read|write, kind, records) of a Partner Center request."""
    method, path = entry.method, entry.path.rstrip("/")
    if method == "GET":
        q = _query(entry.target)
        flt = (q.get("$filter") or [""])[0]
        if re.search(r"/referrals/[^/]+$", path) and "skiptoken" not in entry.target.lower():
            return "read", "get referral by id", 1
        if "engagementId eq" in flt:
            return "read", "list: engagement lookup (Microsoft's side)", 0
        if "externalReferenceId eq" in flt:
            return "read", "list: lookup by externalReferenceId (before creates)", 0
        if "$skiptoken" in entry.target.lower() or "skiptoken" in entry.target.lower():
            return "read", "list: extract (next pages)", 0
        return "read", "list: extract", 0
    body = _json(entry)
    if method == "POST":
        targets = (body or {}).get("target") or []
        if any(t.get("id") == "msft" for t in targets if isinstance(t, dict)):
            return "write", "create: ask Microsoft (co-sell)", 1
        return "write", "create referral", 1
    if method == "PATCH":
        paths = {str(op.get("path")) for op in body or [] if isinstance(op, dict)}
        if paths and paths <= {"/externalReferenceId"}:
            return "write", "patch: link stamp (externalReferenceId)", 1
        return "write", "patch: update", 1
    return "write", f"{method.lower()} referral", 1


def classify_salesforce(entry: Any, jobs: dict[str, Any]) -> tuple[str, str, int]:
    method, path = entry.method, entry.path.rstrip("/")
    tail = re.sub(r"^/services/data/v[\d.]+", "", path)
    if tail.startswith("/query"):
        if re.match(r"/query/[^/]+$", tail):
            return "read", "query: next page", 0
        soql = (_query(entry.target).get("q") or [""])[0]
        obj = re.search(r"\bFROM\s+(\w+)\s*(?:WHERE|ORDER|LIMIT|$)", soql.replace("\n", " "), re.I)
        name = obj.group(1) if obj else "?"
        if "OpportunityContactRoles" in soql and " IN (" not in soql:
            return "read", "query: extract Opportunity", 0
        if "OpportunityContactRoles" in soql:
            return "read", "query: Opportunity by id/referral id (extract shape)", 0
        return "read", f"query: {name} lookup", 0
    if tail.startswith("/jobs/ingest"):
        m = re.match(r"/jobs/ingest/([^/]+)", tail)
        job = jobs.get(m.group(1)) if m else None
        if job is None and method == "POST":
            body = _json(entry) or {}
            label = f"bulk {body.get('operation')} {body.get('object')}"
        else:
            label = f"bulk {job.operation} {job.object}" if job else "bulk ?"
        records = len(job.successes) + len(job.failures) if job and method == "PUT" else 0
        return "write", label, records
    if tail.startswith("/composite/sobjects"):
        body = _json(entry) or {}
        records = body.get("records") or []
        types = {(r.get("attributes") or {}).get("type") for r in records if isinstance(r, dict)}
        obj = "/".join(sorted(t for t in types if t)) or "?"
        op = {"POST": "create", "PATCH": "update", "DELETE": "delete"}.get(method, method.lower())
        if method == "PATCH" and re.match(r"/composite/sobjects/[^/]+/[^/]+$", tail):
            op = "upsert"
        return "write", f"collections {op} {obj}", len(records)
    if method == "GET" and tail.endswith("/describe"):
        return "read", "describe (metadata)", 0
    return ("read" if method == "GET" else "write"), f"{method} {tail}", 0 if method == "GET" else 1


_DV_PART = re.compile(rb"^(GET|POST|PATCH|PUT|DELETE) (\S+) HTTP/1\.1", re.M)


def classify_dataverse(entry: Any) -> tuple[str, str, int]:
    method, path = entry.method, unquote(entry.path).rstrip("/")
    tail = re.sub(r"^/api/data/v[\d.]+", "", path)
    if tail == "/$batch":
        parts = _DV_PART.findall(entry.body or b"")
        kinds = Counter()
        for verb, url in parts:
            target = unquote(re.sub(r"^.*/api/data/v[\d.]+/", "", url.decode()).lstrip("/"))
            set_name = re.split(r"[(?/]", target)[0]
            op = {"POST": "create", "PATCH": "update", "DELETE": "delete"}.get(verb.decode(), verb.decode())
            if verb == b"PATCH" and re.match(r"\w+\(\w+=", target):
                op = "upsert"  # by an alternate key
            elif verb == b"POST" and "Microsoft.Dynamics.CRM." in target:
                op = target.rsplit(".", 1)[-1]
            kinds[f"{op} {set_name}"] += 1
        label = ", ".join(sorted(kinds)) or "empty"
        return "write", f"$batch [{label}]", len(parts)
    m = re.match(r"/(\w+)/Microsoft\.Dynamics\.CRM\.(\w+)$", tail)
    if m and method == "POST":
        body = _json(entry) or {}
        return "write", f"{m.group(2)} {m.group(1)}", len(body.get("Targets") or [])
    if method == "GET":
        if tail.startswith("/EntityDefinitions"):
            return "read", "metadata (EntityDefinitions)", 0
        set_name = re.split(r"[(?/]", tail.lstrip("/"))[0]
        q = _query(entry.target)
        if "$skiptoken" in entry.target or "skiptoken" in entry.target.lower():
            return "read", f"query {set_name}: next page", 0
        flt = (q.get("$filter") or [""])[0]
        if set_name == "opportunities" and (not flt or "modifiedon" in flt) and " or " not in flt:
            return "read", "query opportunities: extract", 0
        return "read", f"query {set_name}: lookup", 0
    m = re.match(r"/(\w+)", tail)
    return "write", f"{method} {m.group(1) if m else tail}", 1


# -- the floor ----------------------------------------------------------------------------------------
def _sf_write_floor(records: int) -> int:
    if records <= 0:
        return 0
    return BULK_JOB_CALLS if records > SF_BULK_ABOVE else math.ceil(records / SF_COLLECTION)


def _write_kind(system: str, label: str) -> str:
    """The write kind a call belongs to (its object and operation), whatever API carried it."""
    if system == "salesforce":
        m = re.match(r"(?:bulk|collections) (\w+) (\S+)", label)
        if m:
            op = {"insert": "create"}.get(m.group(1), m.group(1))
            return f"{op} {m.group(2)}"
    return label


def floor_table(rows: list[dict[str, Any]], *, pc_listed: int, crm_extracted: int, crm: str) -> dict[str, int]:
    """The floor per system, from the calls' own records."""
    floor: Counter[str] = Counter()
    sf_kinds: Counter[str] = Counter()
    for row in rows:
        if row["direction"] != "write":
            continue
        if row["system"] == "partner_center":
            floor["partner_center"] += row["records"]
        elif row["system"] == "salesforce":
            sf_kinds[_write_kind("salesforce", row["kind"])] += row["records"]
        elif row["system"] == "dynamics365":
            floor["dynamics365"] += math.ceil(row["records"] / DV_BATCH) if row["records"] else 0
    floor["salesforce"] += sum(_sf_write_floor(n) for n in sf_kinds.values())
    floor["partner_center"] += max(1, math.ceil(pc_listed / PC_PAGE))
    page = SF_QUERY_PAGE if crm == "salesforce" else DV_PAGE
    floor[crm] += max(1, math.ceil(crm_extracted / page))
    floor["token"] += 1 if crm == "salesforce" else 2  # Partner Center (+ Dataverse)
    return dict(floor)


def task_at(at: float, windows: dict[str, tuple[float, float]]) -> str:
    for task, (start, end) in windows.items():
        if start <= at <= end:
            return task
    return "?"


def kind_rows(
    sb: Any, crm: str, inflight: dict[str, Any], windows: dict[str, tuple[float, float]]
) -> list[dict[str, Any]]:
    """One row per (system, direction, kind) of the requests each emulator served (``inflight``:
    system -> its ``InFlight`` counter): calls, records, the tasks that made them, and
    the floor of that kind."""
    jobs = dict(sb.salesforce.bulk.jobs) if crm == "salesforce" else {}
    systems: list[tuple[str, Callable[[Any], tuple[str, str, int]]]] = [
        ("token", classify_entra),
        ("partner_center", classify_partner_center),
        (crm, (lambda e: classify_salesforce(e, jobs)) if crm == "salesforce" else classify_dataverse),
    ]
    grouped: dict[tuple[str, str, str], dict[str, Any]] = {}
    for system, classify in systems:
        for entry in list(inflight[system].seen):
            direction, kind, records = classify(entry)
            if system == "token":
                direction = "token"
            key = (system, direction, kind)
            row = grouped.setdefault(
                key,
                {"system": system, "direction": direction, "kind": kind, "calls": 0, "records": 0, "status": {}},
            )
            row.setdefault("tasks", Counter())[task_at(entry.at, windows)] += 1
            row["calls"] += 1
            row["records"] += records
            row["status"][str(entry.status)] = row["status"].get(str(entry.status), 0) + 1
    rows = sorted(grouped.values(), key=lambda r: (r["system"], r["direction"], -r["calls"]))
    for row in rows:
        row["tasks"] = dict(row["tasks"])
    for row in rows:  # each kind's own floor, where the floor counts it
        if row["direction"] == "write" and row["system"] == "partner_center":
            row["floor"] = row["records"]
        elif row["direction"] == "write" and row["system"] == "dynamics365":
            row["floor"] = math.ceil(row["records"] / DV_BATCH) if row["records"] else 0
        elif row["direction"] == "token":
            row["floor"] = None
        elif row["direction"] == "write" and row["system"] == "salesforce":
            row["floor"] = None  # per write kind across collections and bulk: see by_write_kind
        else:
            row["floor"] = None
    return rows


def sf_write_kinds(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for row in rows:
        if row["system"] == "salesforce" and row["direction"] == "write":
            kind = out.setdefault(_write_kind("salesforce", row["kind"]), {"calls": 0, "records": 0})
            kind["calls"] += row["calls"]
            kind["records"] += row["records"]
    for kind in out.values():
        kind["floor"] = _sf_write_floor(kind["records"])
    return out
