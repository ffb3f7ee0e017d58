"""Salesforce writes: create, update, delete and upsert by External ID, as Python methods
and REST handlers (single records and ``composite/sobjects`` collections)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..server import Request, Response
from .records import MultipleMatches, RecordError, _bad, _ext_not_found, _Locator, _not_found, _success
from .schema import MAX_COLLECTION, MAX_COLLECTION_RETRIEVE, ROLLED_BACK, USER_ID
from .soql import FieldDef, ObjectDef, normalize_id


class WritesMixin:
    """The DML of :class:`SalesforceEmulator`."""

    def _new_record(self, odef: ObjectDef, record: dict[str, Any], created: str, modified: str) -> None:
        """The system fields of a new record: its Id, who created and last modified it, and when."""
        record.update(
            {
                "Id": self._new_id(odef.key_prefix),
                "IsDeleted": False,
                "CreatedDate": created,
                "CreatedById": USER_ID,
                "LastModifiedDate": modified,
                "LastModifiedById": USER_ID,
                "SystemModstamp": modified,
            }
        )

    def create_record(self, obj: str, values: dict[str, Any]) -> dict[str, Any]:
        """Insert (values keyed by canonical field names, already typed); raises :class:`RecordError`."""
        odef = self._object(obj)
        record = self._validate(odef, values, None)
        stamp = self._stamp()
        self._new_record(odef, record, stamp, stamp)
        self._derive(odef, record)
        full = {name: record.get(name) for name in odef.fields}
        self._put(odef.name, full)
        self._after_write(odef, full)
        return full

    def update_record(
        self, obj: str, record_id: str, values: dict[str, Any], *, user_edit: bool = True
    ) -> dict[str, Any]:
        odef = self._object(obj)
        existing = self.records[odef.name][record_id]
        record = self._validate(odef, values, existing)
        stamp = self._stamp()
        record["SystemModstamp"] = stamp
        if user_edit:
            record["LastModifiedDate"] = stamp
            record["LastModifiedById"] = USER_ID
        self._derive(odef, record)
        self._put(odef.name, record)
        self._after_write(odef, record)
        return record

    def _delete_cascade(self, obj: str, record_id: str) -> None:
        odef = self.schema.objects[obj]
        record = self.records[obj][record_id]
        stamp = self._stamp()
        deleted = {**record, "IsDeleted": True, "SystemModstamp": stamp, "LastModifiedDate": stamp, "_deleted": stamp}
        self._put(obj, deleted)
        for rel in odef.children:
            if not rel.cascade_delete:
                continue
            for child in list(self.records[rel.child].values()):
                if child.get(rel.field) == record_id and not child["IsDeleted"]:
                    self._delete_cascade(rel.child, child["Id"])

    def purge_record(self, obj: str, record_id: str) -> None:
        """Hard delete: the record (and its cascade) leaves the org without passing the recycle bin."""
        odef = self.schema.objects[obj]
        record = self.records[obj].get(record_id)
        if record is None:
            return
        for rel in odef.children:
            if rel.cascade_delete:
                for child in [c for c in self.records[rel.child].values() if c.get(rel.field) == record_id]:
                    self.purge_record(rel.child, child["Id"])
        self._index_ops(obj, record, add=False)
        del self.records[obj][record_id]

    def upsert_record(
        self, obj: str, field_name: str, value: Any, values: dict[str, Any]
    ) -> tuple[dict[str, Any], bool]:
        """Upsert by an External ID field; returns (record, created). Several matches raise ``MultipleMatches``."""
        odef = self._object(obj)
        fdef = odef.field(field_name)
        assert fdef is not None
        matches = self._ext_matches(odef.name, fdef.name, value)
        if len(matches) > 1:
            raise MultipleMatches(matches)
        body = {k: v for k, v in values.items() if k != fdef.name}
        if matches:
            return self.update_record(odef.name, matches[0], body), False
        body[fdef.name] = value
        return self.create_record(odef.name, body), True

    def _ext_field(self, odef: ObjectDef, name: str) -> FieldDef:
        fdef = odef.field(name)
        if fdef is None or not (fdef.external_id or fdef.name == "Id"):
            raise _ext_not_found(name)
        return fdef

    def _public(
        self, odef: ObjectDef, record: dict[str, Any], version: str, fields: list[str] | None = None
    ) -> dict[str, Any]:
        out: dict[str, Any] = {"attributes": {"type": odef.name, "url": self._url(version, odef.name, record["Id"])}}
        for name in fields if fields is not None else list(odef.fields):
            out[name] = record.get(name)
        return out

    def _field_list(self, odef: ObjectDef, raw: str | None) -> list[str] | None:
        if raw is None:
            return None
        names = []
        for part in (p.strip() for p in raw.split(",")):
            if not part:
                continue
            fdef = odef.field(part)
            if fdef is None:
                raise _bad(
                    "INVALID_FIELD",
                    f"No such column '{part}' on entity '{odef.name}'. If you are attempting to use a custom field, "
                    "be sure to append the '__c' after the custom field name. Please reference your WSDL or the "
                    "describe call for the appropriate names.",
                )
            names.append(fdef.name)
        return names

    # -- sObject rows -------------------------------------------------------------------
    def _create(self, request: Request) -> Response:
        odef = self._object(request.params["obj"])
        body, raw = self._body(request)
        values = self._from_json(odef, body, _Locator(raw))
        with self.lock:
            try:
                record = self.create_record(odef.name, values)
            except RecordError as err:
                raise err.http() from None
        return Response.json(_success(record["Id"]), 201)

    def _get(self, request: Request) -> Response:
        odef = self._object(request.params["obj"])
        fields = self._field_list(odef, request.arg("fields"))
        with self.lock:
            try:
                record_id = self._resolve_record_id(odef, request.params["id"], rest=True)
            except RecordError as err:
                raise err.http(404 if err.code == "ENTITY_IS_DELETED" else 400) from None
            return Response.json(
                self._public(odef, self.records[odef.name][record_id], request.params["version"], fields)
            )

    def _update(self, request: Request) -> Response:
        odef = self._object(request.params["obj"])
        body, raw = self._body(request)
        values = self._from_json(odef, body, _Locator(raw))
        with self.lock:
            try:
                record_id = self._resolve_record_id(odef, request.params["id"], rest=True)
                self.update_record(odef.name, record_id, values)
            except RecordError as err:
                raise err.http(404 if err.code == "ENTITY_IS_DELETED" else 400) from None
        return Response.empty(204)

    def _delete(self, request: Request) -> Response:
        odef = self._object(request.params["obj"])
        with self.lock:
            try:
                record_id = self._resolve_record_id(odef, request.params["id"], rest=True)
            except RecordError as err:
                raise err.http(404 if err.code == "ENTITY_IS_DELETED" else 400) from None
            self._delete_cascade(odef.name, record_id)
        return Response.empty(204)

    def _ext_lookup(self, request: Request) -> tuple[ObjectDef, FieldDef, str, list[str]]:
        odef = self._object(request.params["obj"])
        fdef = self._ext_field(odef, request.params["field"])
        value = request.params["value"]
        if fdef.name == "Id":
            normalized = normalize_id(value)
            record = self.records[odef.name].get(normalized or "")
            matches = [record["Id"]] if record and not record["IsDeleted"] else []
        else:
            matches = self._ext_matches(odef.name, fdef.name, value)
        return odef, fdef, value, matches

    def _multiple(self, odef: ObjectDef, matches: list[str], version: str) -> Response:
        return Response.json([self._url(version, odef.name, m) for m in matches], 300)

    def _ext_records(self, request: Request) -> tuple[ObjectDef, list[str]]:
        """The object and the ids of the records an External ID value names; 404 for none (hold self.lock)."""
        odef, _fdef, _value, matches = self._ext_lookup(request)
        if not matches:
            raise _not_found()
        return odef, matches

    def _get_by_ext(self, request: Request) -> Response:
        with self.lock:
            odef, matches = self._ext_records(request)
            if len(matches) > 1:
                return self._multiple(odef, matches, request.params["version"])
            fields = self._field_list(odef, request.arg("fields"))
            return Response.json(
                self._public(odef, self.records[odef.name][matches[0]], request.params["version"], fields)
            )

    def _delete_by_ext(self, request: Request) -> Response:
        with self.lock:
            odef, matches = self._ext_records(request)
            if len(matches) > 1:
                return self._multiple(odef, matches, request.params["version"])
            self._delete_cascade(odef.name, matches[0])
        return Response.empty(204)

    def _upsert(self, request: Request) -> Response:
        odef = self._object(request.params["obj"])
        body, raw = self._body(request)
        values = self._from_json(odef, body, _Locator(raw))
        with self.lock:
            odef, fdef, value, matches = self._ext_lookup(request)
            if len(matches) > 1:
                return self._multiple(odef, matches, request.params["version"])
            try:
                if fdef.name == "Id":
                    if not matches:
                        raise _not_found()
                    record = self.update_record(odef.name, matches[0], values)
                    created = False
                else:
                    coerced = self._coerce_json(fdef, value, lambda: "[line:1, column:1]")
                    record, created = self.upsert_record(odef.name, fdef.name, coerced, values)
            except RecordError as err:
                raise err.http() from None
        return Response.json(_success(record["Id"], created=created), 201 if created else 200)

    # -- sObject collections --------------------------------------------------------------------
    def _collection_body(self, request: Request) -> tuple[list[Any], bool, _Locator]:
        body, raw = self._body(request)
        if not isinstance(body, dict):
            raise _bad(
                "JSON_PARSER_ERROR",
                "Cannot deserialize instance of SObjectCollection from START_ARRAY value [ or request may be missing a "
                "required field at [line:1, column:1]",
            )
        records = body.get("records")
        if not isinstance(records, list):
            raise _bad("INVALID_FIELD", "The records field is required and must be a list of sObjects")
        if len(records) > MAX_COLLECTION:
            raise _bad("EXCEEDED_ID_LIMIT", "record limit reached. cannot submit more than 200 records into this call")
        all_or_none = body.get("allOrNone", False)
        if not isinstance(all_or_none, bool):
            raise _bad(
                "JSON_PARSER_ERROR",
                f"Cannot deserialize instance of boolean from VALUE_STRING value {all_or_none} or request may be "
                "missing a required field at [line:1, column:1]",
            )
        return records, all_or_none, _Locator(raw)

    def _typed(self, record: Any, expected: str | None = None) -> ObjectDef:
        attrs = record.get("attributes") if isinstance(record, dict) else None
        type_name = attrs.get("type") if isinstance(attrs, dict) else None
        if not type_name:
            raise _bad("INVALID_TYPE", "Must send a concrete entity type.")
        odef = self.schema.get(str(type_name))
        if odef is None:
            raise _bad(
                "INVALID_TYPE",
                f"sObject type '{type_name}' is not supported. If you are attempting to use a custom object, be sure "
                "to append the '__c' after the entity name. Please reference your WSDL or the describe call for the "
                "appropriate names.",
            )
        if expected is not None and odef.name != expected:
            raise _bad("INVALID_TYPE", f"Record type {odef.name} does not match the URI type {expected}")
        return odef

    def _run_collection(
        self, ops: list[Callable[[], dict[str, Any]]], all_or_none: bool, ids: list[str | None], upsert: bool = False
    ) -> list[dict[str, Any]]:
        """Run one write per record; with allOrNone any failure rolls everything back."""
        results: list[dict[str, Any]] = []
        with self._transaction() as log:
            failed = False
            for op, known_id in zip(ops, ids, strict=True):
                try:
                    results.append(op())
                except RecordError as err:
                    failed = True
                    failure: dict[str, Any] = {"success": False, "errors": [err.item()]}
                    if known_id and err.code != "MALFORMED_ID":
                        failure = {"id": known_id, **failure}
                    results.append(failure)
            if all_or_none and failed:
                self._rollback(log)
                rolled = []
                for result, known_id in zip(results, ids, strict=True):
                    if result["success"]:
                        item: dict[str, Any] = {"success": False, "errors": [dict(ROLLED_BACK)]}
                        if known_id:
                            item = {"id": known_id, **item}
                        rolled.append(item)
                    else:
                        rolled.append(result)
                results = rolled
        if upsert:
            results = [r if "created" in r else {**r, "created": False} for r in results]
        return results

    def _collection_create(self, request: Request) -> Response:
        records, all_or_none, locator = self._collection_body(request)
        prepared = []
        for record in records:
            odef = self._typed(record)
            prepared.append((odef, self._from_json(odef, record, locator)))
        ops = []
        for odef, values in prepared:

            def op(o: ObjectDef = odef, v: dict[str, Any] = values) -> dict[str, Any]:
                created = self.create_record(o.name, v)
                return _success(created["Id"])

            ops.append(op)
        with self.lock:
            return Response.json(self._run_collection(ops, all_or_none, [None] * len(ops)))

    def _collection_update(self, request: Request) -> Response:
        records, all_or_none, locator = self._collection_body(request)
        prepared = []
        for record in records:
            odef = self._typed(record)
            raw_id = next((v for k, v in record.items() if k.lower() == "id"), None)
            body = {k: v for k, v in record.items() if k.lower() != "id"}
            prepared.append((odef, raw_id, self._from_json(odef, body, locator)))
        with self.lock:
            counts: dict[str, int] = {}
            for _odef, raw_id, _v in prepared:
                key = normalize_id(str(raw_id)) if raw_id else None
                if key:
                    counts[key] = counts.get(key, 0) + 1
            ops = []
            ids: list[str | None] = []
            for odef, raw_id, values in prepared:
                normalized = normalize_id(str(raw_id)) if isinstance(raw_id, str) else None
                known = normalized if normalized and normalized in self.records[odef.name] else None
                ids.append(known)

                def op(o: ObjectDef = odef, rid: Any = raw_id, v: dict[str, Any] = values) -> dict[str, Any]:
                    if not rid:
                        raise RecordError("MISSING_ARGUMENT", "Id not specified in an update call", [])
                    if not isinstance(rid, str) or normalize_id(rid) is None:
                        raise RecordError("MALFORMED_ID", f"{o.label} ID: id value of incorrect type: {rid}", ["Id"])
                    record_id = self._resolve_record_id(o, rid, rest=False)
                    if counts.get(record_id, 0) > 1:
                        raise RecordError("DUPLICATE_VALUE", f"Duplicate id in list: {record_id}", [])
                    self.update_record(o.name, record_id, v)
                    return _success(record_id)

                ops.append(op)
            return Response.json(self._run_collection(ops, all_or_none, ids))

    def _collection_upsert(self, request: Request) -> Response:
        odef = self._object(request.params["obj"])
        fdef = self._ext_field(odef, request.params["field"])
        records, all_or_none, locator = self._collection_body(request)
        prepared = []
        for record in records:
            self._typed(record, odef.name)
            prepared.append(self._from_json(odef, record, locator))
        with self.lock:
            values_seen: dict[str, int] = {}
            for values in prepared:
                if values.get(fdef.name) is not None:
                    key = str(values[fdef.name]).casefold()
                    values_seen[key] = values_seen.get(key, 0) + 1
            ops = []
            ids: list[str | None] = []
            for values in prepared:
                ext = values.get(fdef.name)
                matches = self._ext_matches(odef.name, fdef.name, ext) if ext is not None and fdef.name != "Id" else []
                ids.append(matches[0] if len(matches) == 1 else None)

                def op(v: dict[str, Any] = values) -> dict[str, Any]:
                    ext_value = v.get(fdef.name)
                    if ext_value is None:
                        raise RecordError("MISSING_ARGUMENT", f"{fdef.name} not specified", [fdef.name])
                    if values_seen.get(str(ext_value).casefold(), 0) > 1:
                        raise RecordError(
                            "DUPLICATE_EXTERNAL_ID", f"Duplicate external id specified: {ext_value}", [fdef.name]
                        )
                    if fdef.name == "Id":
                        record_id = self._resolve_record_id(odef, str(ext_value), rest=False)
                        self.update_record(odef.name, record_id, {k: x for k, x in v.items() if k != "Id"})
                        return _success(record_id, created=False)
                    try:
                        record, created = self.upsert_record(odef.name, fdef.name, ext_value, v)
                    except MultipleMatches as multi:
                        raise RecordError(
                            "DUPLICATE_EXTERNAL_ID",
                            f"{fdef.label}: more than one record found for external id field: [{', '.join(multi.ids)}]",
                            [fdef.name],
                        ) from None
                    return _success(record["Id"], created=created)

                ops.append(op)
            return Response.json(self._run_collection(ops, all_or_none, ids, upsert=True))

    def _collection_delete(self, request: Request) -> Response:
        raw = request.arg("ids")
        if not raw:
            raise _bad("MISSING_ARGUMENT", "ids parameter is required")
        raw_ids = [i.strip() for i in raw.split(",") if i.strip()]
        if len(raw_ids) > MAX_COLLECTION:
            raise _bad("EXCEEDED_ID_LIMIT", "record limit reached. cannot submit more than 200 records into this call")
        all_or_none = (request.arg("allOrNone") or "false").lower() == "true"
        by_prefix = {o.key_prefix: o for o in self.schema.objects.values()}
        with self.lock:
            ops = []
            ids: list[str | None] = []
            for rid in raw_ids:
                normalized = normalize_id(rid)
                ids.append(normalized if normalized and normalized[:3] in by_prefix else None)

                def op(r: str = rid) -> dict[str, Any]:
                    norm = normalize_id(r)
                    odef = by_prefix.get(norm[:3]) if norm else None
                    if norm is None or odef is None:
                        raise RecordError("MALFORMED_ID", f"malformed id {r}", [])
                    record = self.records[odef.name].get(norm)
                    if record is None:
                        raise RecordError("INVALID_CROSS_REFERENCE_KEY", "invalid cross reference id", [])
                    if record["IsDeleted"]:
                        raise RecordError("ENTITY_IS_DELETED", "entity is deleted", [])
                    self._delete_cascade(odef.name, norm)
                    return _success(norm)

                ops.append(op)
            return Response.json(self._run_collection(ops, all_or_none, ids))

    def _collection_retrieve(self, request: Request) -> Response:
        odef = self._object(request.params["obj"])
        if request.method == "POST":
            body, _raw = self._body(request)
            ids_list = body.get("ids") if isinstance(body, dict) else None
            fields_list = body.get("fields") if isinstance(body, dict) else None
            if not isinstance(ids_list, list) or not isinstance(fields_list, list):
                raise _bad("JSON_PARSER_ERROR", "ids and fields are required lists")
            raw_ids = [str(i) for i in ids_list]
            fields_raw = ",".join(str(f) for f in fields_list)
        else:
            raw_ids = [i for i in (request.arg("ids") or "").split(",") if i]
            fields_raw = request.arg("fields") or ""
        if not raw_ids or not fields_raw:
            raise _bad("MISSING_ARGUMENT", "Both ids and fields must be specified")
        if len(raw_ids) > MAX_COLLECTION_RETRIEVE:
            raise _bad("EXCEEDED_ID_LIMIT", "record limit reached. cannot submit more than 2000 records into this call")
        fields = self._field_list(odef, fields_raw)
        out: list[Any] = []
        with self.lock:
            for rid in raw_ids:
                norm = normalize_id(rid)
                if norm is None:
                    raise _bad("MALFORMED_ID", f"malformed id {rid}")
                record = self.records[odef.name].get(norm)
                if record is None or record["IsDeleted"] or norm[:3] != odef.key_prefix:
                    out.append(None)
                else:
                    out.append(self._public(odef, record, request.params["version"], fields))
        return Response.json(out)
