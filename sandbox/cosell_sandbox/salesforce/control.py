"""The Salesforce emulator's control plane: time, reset, schema tweaks, CRM-user edits, state,
and the ``/_sandbox/`` endpoints beyond the shared ones of :class:`~cosell_sandbox.server.EmulatorApp`."""

from __future__ import annotations

import json
import re
import time
from dataclasses import replace
from datetime import timedelta
from typing import Any

from ..server import Request, Response
from .records import RecordError, _bad, _Locator, _not_found
from .schema import DEFAULT_DAILY_LIMIT, build_schema
from .soql import FieldDef, normalize_id, parse_datetime, sf_datetime


class ControlMixin:
    """Control methods and handlers of :class:`SalesforceEmulator`."""

    # -- control plane: Python ----------------------------------------------------------------
    AGED_STAMPS = ("CreatedDate", "LastModifiedDate", "SystemModstamp")

    def age(self, seconds: float) -> int:
        """Time passes: every record's stamps (created, last modified, SystemModstamp) move
        ``seconds`` into the past, as if everything had happened that much earlier; the server's
        own clock (the ``Date`` of its answers) is not touched. Returns the records aged."""
        delta = timedelta(seconds=seconds)
        aged = 0
        with self.lock:
            for records in self.records.values():
                for record in records.values():
                    for key in self.AGED_STAMPS:
                        if isinstance(record.get(key), str):
                            record[key] = sf_datetime(parse_datetime(record[key]) - delta)
                    aged += 1
        return aged

    def reset(self) -> None:
        """Empty org, default schema, default limits, no cursors or jobs; the default token is valid again."""
        with self.lock:
            self.schema = build_schema()
            self._reset_store()
            self._cursors.clear()
            self._counters.clear()
            self.bulk.reset()
            self.daily_limit = DEFAULT_DAILY_LIMIT
            self.api_used = 0
            self.query_locator_ttl = 15 * 60.0
            self.max_open_cursors = 10
            self.bulk_delay = 0.05
            self.clock = time.time
            self.tokens.add(self.access_token)
        super().reset()

    def declare_external_id(
        self, obj: str, field_name: str, *, unique: bool = False, length: int = 255, label: str | None = None
    ) -> FieldDef:
        """Add (or redefine) a custom text External ID field, e.g. ``Legacy_Id__c`` without ``unique``."""
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*__c", field_name):
            raise ValueError("custom field names end in __c")
        with self.lock:
            odef = self._object(obj)
            fdef = FieldDef(
                name=field_name,
                type="string",
                label=label or field_name.removesuffix("__c").replace("_", " "),
                length=length,
                external_id=True,
                unique=unique,
                custom=True,
            )
            existing = odef.field(field_name)
            if existing is not None:
                fdef = replace(fdef, name=existing.name)
            odef.fields[fdef.name] = fdef
            index: dict[str, set[str]] = {}
            self._ext_index[(odef.name, fdef.name)] = index
            for record in self.records[odef.name].values():
                record.setdefault(fdef.name, None)
                self._index_ops_single(index, record, fdef.name)
            return fdef

    def remove_field(self, obj: str, field_name: str) -> None:
        """An admin deletes a custom field: ``describe`` no longer lists it and records lose its
        values (``reset`` brings the default schema back). Standard fields cannot be deleted."""
        with self.lock:
            odef = self._object(obj)
            fdef = odef.field(field_name)
            if fdef is None or not fdef.custom:
                raise ValueError(f"{obj}.{field_name} is not a custom field of this org")
            del odef.fields[fdef.name]
            self._ext_index.pop((odef.name, fdef.name), None)
            for record in self.records[odef.name].values():
                record.pop(fdef.name, None)

    @staticmethod
    def _index_ops_single(index: dict[str, set[str]], record: dict[str, Any], fname: str) -> None:
        if record.get(fname) is not None and not record.get("IsDeleted"):
            index.setdefault(str(record[fname]).casefold(), set()).add(record["Id"])

    def typed_values(self, obj: str, values: dict[str, Any]) -> dict[str, Any]:
        """JSON-style values (as a CRM user or the REST API would send them) as stored values."""
        odef = self._object(obj)
        raw = json.dumps(values)
        return self._from_json(odef, json.loads(raw), _Locator(raw))

    def user_create(self, obj: str, values: dict[str, Any]) -> dict[str, Any]:
        """A CRM user creates a record (JSON-style values); raises :class:`RecordError` or HTTPError."""
        with self.lock:
            return dict(self.create_record(self._object(obj).name, self.typed_values(obj, values)))

    def user_edit(self, obj: str, record_id: str, values: dict[str, Any]) -> dict[str, Any]:
        """A CRM user edits a record: bumps LastModifiedDate and SystemModstamp."""
        with self.lock:
            odef = self._object(obj)
            rid = self._resolve_record_id(odef, record_id, rest=True)
            return dict(self.update_record(odef.name, rid, self.typed_values(obj, values)))

    def touch(self, obj: str, record_id: str) -> dict[str, Any]:
        """An automated process touches a record: SystemModstamp changes, LastModifiedDate does not."""
        with self.lock:
            odef = self._object(obj)
            rid = self._resolve_record_id(odef, record_id, rest=True)
            return dict(self.update_record(odef.name, rid, {}, user_edit=False))

    def user_delete(self, obj: str, record_id: str) -> None:
        with self.lock:
            odef = self._object(obj)
            rid = self._resolve_record_id(odef, record_id, rest=True)
            self._delete_cascade(odef.name, rid)

    def get_record(self, obj: str, record_id: str) -> dict[str, Any] | None:
        with self.lock:
            odef = self._object(obj)
            normalized = normalize_id(record_id)
            record = self.records[odef.name].get(normalized or "")
            return None if record is None else {k: v for k, v in record.items() if not k.startswith("_")}

    def list_records(self, obj: str, include_deleted: bool = False) -> list[dict[str, Any]]:
        with self.lock:
            odef = self._object(obj)
            return [
                {k: v for k, v in r.items() if not k.startswith("_")}
                for r in self.records[odef.name].values()
                if include_deleted or not r["IsDeleted"]
            ]

    def state(self) -> dict[str, Any]:
        with self.lock:
            counts = {name: sum(1 for r in recs.values() if not r["IsDeleted"]) for name, recs in self.records.items()}
            deleted = {name: sum(1 for r in recs.values() if r["IsDeleted"]) for name, recs in self.records.items()}
            return {
                "records": counts,
                "deleted": deleted,
                "flagged": sum(
                    1
                    for r in self.records["Opportunity"].values()
                    if not r["IsDeleted"] and r.get("PC_Sync_With_Partner_Center__c")
                ),
                "apiUsage": {"used": self.api_used, "limit": self.daily_limit},
                "tokens": len(self.tokens),
                "openCursors": len(self._cursors),
                "bulkJobs": {
                    state: sum(1 for j in self.bulk.jobs.values() if j.state == state)
                    for state in sorted({j.state for j in self.bulk.jobs.values()})
                },
                "queryLocatorTtl": self.query_locator_ttl,
                "maxOpenCursors": self.max_open_cursors,
                "bulkDelay": self.bulk_delay,
            }

    # -- control plane: HTTP -------------------------------------------------------------------
    def _cp_issue(self, request: Request) -> Response:
        return Response.json({"access_token": self.issue_token(), "instance_url": request.origin})

    def _cp_revoke(self, request: Request) -> Response:
        doc = self.control_body(request)
        return Response.json({"revoked": self.revoke_tokens(doc.get("token"))})

    def _cp_external_id(self, request: Request) -> Response:
        doc = self.control_body(request)
        try:
            fdef = self.declare_external_id(
                str(doc.get("object", "Opportunity")),
                str(doc.get("field", "")),
                unique=bool(doc.get("unique", False)),
                length=int(doc.get("length", 255)),
                label=doc.get("label"),
            )
        except ValueError as exc:
            raise _bad("INVALID_REQUEST", str(exc)) from None
        return Response.json(self._describe_field(fdef))

    def _cp_remove_field(self, request: Request) -> Response:
        try:
            self.remove_field(request.params["obj"], request.params["field"])
        except ValueError as exc:
            raise _bad("INVALID_REQUEST", str(exc)) from None
        return Response.empty()

    def _cp_records(self, request: Request) -> Response:
        include = (request.arg("include_deleted") or "").lower() in ("1", "true")
        return Response.json({"records": self.list_records(request.params["obj"], include)})

    def _cp_record(self, request: Request) -> Response:
        record = self.get_record(request.params["obj"], request.params["id"])
        if record is None:
            raise _not_found()
        return Response.json(record)

    def _cp_create(self, request: Request) -> Response:
        try:
            return Response.json(self.user_create(request.params["obj"], self.control_body(request)), 201)
        except RecordError as err:
            raise err.http() from None

    def _cp_edit(self, request: Request) -> Response:
        try:
            return Response.json(
                self.user_edit(request.params["obj"], request.params["id"], self.control_body(request))
            )
        except RecordError as err:
            raise err.http(404 if err.code == "ENTITY_IS_DELETED" else 400) from None

    def _cp_touch(self, request: Request) -> Response:
        try:
            return Response.json(self.touch(request.params["obj"], request.params["id"]))
        except RecordError as err:
            raise err.http(404 if err.code == "ENTITY_IS_DELETED" else 400) from None

    def _cp_delete(self, request: Request) -> Response:
        try:
            self.user_delete(request.params["obj"], request.params["id"])
        except RecordError as err:
            raise err.http(404 if err.code == "ENTITY_IS_DELETED" else 400) from None
        return Response.empty()

    def _cp_jobs(self, request: Request) -> Response:
        with self.lock:
            return Response.json({"jobs": [job.info() for job in self.bulk.jobs.values()]})
