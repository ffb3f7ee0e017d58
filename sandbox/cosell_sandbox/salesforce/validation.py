"""Validation of Salesforce writes: JSON values as field values, references, required fields,
picklists, lengths, numbers and unique External IDs, as the REST API checks them."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import date
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

from ..server import HTTPError
from .records import RecordError, _bad, _ext_not_found, _json_token, _json_type_name, _Locator, _not_found
from .schema import EMAIL_RE, USER_ID, USER_PREFIX
from .soql import FieldDef, ObjectDef, normalize_id, parse_datetime, sf_datetime


class ValidationMixin:
    """Value coercion and record validation of :class:`SalesforceEmulator`."""

    def _coerce_json(self, fdef: FieldDef, value: Any, where: Callable[[], str]) -> Any:
        """A JSON value as the stored value of ``fdef`` (Salesforce's lenient scalar coercions)."""

        def fail() -> HTTPError:
            token, text = _json_token(value)
            return _bad(
                "JSON_PARSER_ERROR",
                f"Cannot deserialize instance of {_json_type_name(fdef)} from {token} value {text} or request may "
                f"be missing a required field at {where()}",
            )

        if value is None:
            return False if fdef.type == "boolean" else None
        if isinstance(value, dict | list):
            raise fail()
        ftype = fdef.type
        if ftype == "boolean":
            if isinstance(value, bool):
                return value
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            raise fail()
        if ftype in ("currency", "double", "percent", "int"):
            if isinstance(value, bool):
                raise fail()
            try:
                number = Decimal(str(value).strip())
            except InvalidOperation:
                raise fail() from None
            if not number.is_finite():
                raise fail()
            return number
        if ftype == "date":
            if isinstance(value, str) and re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
                try:
                    return date.fromisoformat(value).isoformat()
                except ValueError:
                    pass
            raise fail()
        if ftype == "datetime":
            if isinstance(value, str):
                try:
                    return sf_datetime(parse_datetime(value))
                except ValueError:
                    pass
            raise fail()
        if ftype in ("id", "reference"):
            if isinstance(value, str):
                return value.strip() or None
            raise fail()
        if isinstance(value, bool):
            return "true" if value else "false"
        text = value if isinstance(value, str) else json.dumps(value)
        return text if text != "" else None

    def _from_json(self, odef: ObjectDef, body: Any, locator: _Locator) -> dict[str, Any]:
        """A record body as {canonical field name: value}; unknown fields and bad types fail the request."""
        if not isinstance(body, dict):
            token, text = _json_token(body)
            raise _bad(
                "JSON_PARSER_ERROR",
                f"Cannot deserialize instance of {odef.name} from {token} value {text} or request may be missing a "
                "required field at [line:1, column:1]",
            )
        values: dict[str, Any] = {}
        for key, value in body.items():
            if key == "attributes" and isinstance(value, dict):
                continue
            fdef = odef.field(key)
            if fdef is None:
                raise _bad("INVALID_FIELD", f"No such column '{key}' on sobject of type {odef.name}")
            values[fdef.name] = self._coerce_json(fdef, value, lambda k=key: locator.where(k))
        locator.advance(body)
        return values

    # -- validation and writes --------------------------------------------------------
    def _resolve_record_id(self, odef: ObjectDef, raw: str, *, rest: bool) -> str:
        """The canonical Id of a live record of ``odef`` named by ``raw``; the real errors otherwise."""
        normalized = normalize_id(raw)
        if normalized is None:
            if rest:
                raise _ext_not_found(raw)
            raise RecordError("MALFORMED_ID", f"malformed id {raw}")
        if normalized[:3] != odef.key_prefix:
            raise RecordError("MALFORMED_ID", f"{odef.label} ID: id value of incorrect type: {raw}", ["Id"])
        record = self.records[odef.name].get(normalized)
        if record is None:
            if rest:
                raise _not_found()
            raise RecordError("INVALID_CROSS_REFERENCE_KEY", "invalid cross reference id")
        if record["IsDeleted"]:
            raise RecordError("ENTITY_IS_DELETED", "entity is deleted", [])
        return normalized

    def _check_reference(self, fdef: FieldDef, value: str) -> str:
        normalized = normalize_id(value)
        if normalized is None:
            raise RecordError("MALFORMED_ID", f"{fdef.label}: id value of incorrect type: {value}", [fdef.name])
        prefixes = {USER_PREFIX} if "User" in fdef.reference_to else set()
        prefixes |= {o.key_prefix for t in fdef.reference_to if (o := self.schema.get(t)) is not None}
        if normalized[:3] not in prefixes:
            raise RecordError(
                "FIELD_INTEGRITY_EXCEPTION", f"{fdef.label}: id value of incorrect type: {value}", [fdef.name]
            )
        if normalized[:3] == USER_PREFIX:
            if normalized != USER_ID:
                raise RecordError("INVALID_CROSS_REFERENCE_KEY", "invalid cross reference id", [fdef.name])
            return normalized
        target = self.records[fdef.reference_to[0]].get(normalized)
        if target is None:
            raise RecordError("INVALID_CROSS_REFERENCE_KEY", "invalid cross reference id", [fdef.name])
        if target["IsDeleted"]:
            raise RecordError("ENTITY_IS_DELETED", "entity is deleted", [fdef.name])
        return normalized

    def _validate(self, odef: ObjectDef, values: dict[str, Any], existing: dict[str, Any] | None) -> dict[str, Any]:
        """Check a create (``existing`` None) or an update; returns the merged record (system fields not set)."""
        creating = existing is None
        values = dict(values)
        if "Id" in values:
            if creating:
                raise RecordError("INVALID_FIELD_FOR_INSERT_UPDATE", "cannot specify Id in an insert call", ["Id"])
            if normalize_id(str(values["Id"])) == existing["Id"]:
                del values["Id"]
        read_only = [
            name for name in values if not (odef.fields[name].createable if creating else odef.fields[name].updateable)
        ]
        if read_only:
            raise RecordError(
                "INVALID_FIELD_FOR_INSERT_UPDATE",
                f"Unable to create/update fields: {', '.join(read_only)}. Please check the security settings of this "
                "field and verify that it is read/write for your role or profile.",
                read_only,
            )
        merged = dict(existing) if existing else {}
        if creating:
            for fdef in odef.fields.values():
                if fdef.default is not None:
                    merged[fdef.name] = fdef.default
            if "OwnerId" in odef.fields:
                merged["OwnerId"] = USER_ID
        merged.update(values)
        missing = [
            f.name
            for f in odef.fields.values()
            if f.type != "boolean"
            and not f.nillable
            and (f.createable if creating else f.updateable)
            and merged.get(f.name) is None
            and (creating or f.name in values)
        ]
        if missing:
            raise RecordError("REQUIRED_FIELD_MISSING", f"Required fields are missing: [{', '.join(missing)}]", missing)
        for fdef in odef.fields.values():
            if fdef.name not in values:
                continue
            value = merged[fdef.name]
            if value is None:
                continue
            if fdef.type == "picklist" and fdef.restricted and value not in fdef.picklist:
                raise RecordError(
                    "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
                    f"{fdef.label}: bad value for restricted picklist field: {value}",
                    [fdef.name],
                )
            if (
                isinstance(value, str)
                and fdef.length
                and fdef.type not in ("id", "reference")
                and len(value) > fdef.length
            ):
                raise RecordError(
                    "STRING_TOO_LONG",
                    f"{fdef.label}: data value too large: {value} (max length={fdef.length})",
                    [fdef.name],
                )
            if fdef.type == "email" and not EMAIL_RE.fullmatch(value):
                raise RecordError("INVALID_EMAIL_ADDRESS", f"{fdef.label}: invalid email address: {value}", [fdef.name])
            if isinstance(value, Decimal):
                # Checked before rounding as well: 1e300 cannot be quantized at 28 digits, and the
                # real API answers it per record (NUMBER_OUTSIDE_VALID_RANGE), never with a 500.
                digits = fdef.precision - fdef.scale if fdef.precision else 18
                out_of_range = abs(value) >= Decimal(10) ** digits
                if not out_of_range:
                    if fdef.type == "int":
                        value = value.to_integral_value()
                    else:
                        value = value.quantize(Decimal(1).scaleb(-fdef.scale), rounding=ROUND_HALF_UP)
                    out_of_range = abs(value) >= Decimal(10) ** digits
                if out_of_range:
                    raise RecordError(
                        "NUMBER_OUTSIDE_VALID_RANGE",
                        f"{fdef.label}: value outside of valid range on numeric field: {value}",
                        [fdef.name],
                    )
                merged[fdef.name] = int(value) if fdef.type == "int" else float(value)
            if fdef.type == "reference":
                merged[fdef.name] = self._check_reference(fdef, value)
        for fdef in odef.fields.values():
            if fdef.unique and fdef.name in values and merged.get(fdef.name) is not None:
                others = [
                    i for i in self._ext_matches(odef.name, fdef.name, merged[fdef.name]) if i != merged.get("Id")
                ]
                if others:
                    raise RecordError(
                        "DUPLICATE_VALUE",
                        f"duplicate value found: {fdef.name} duplicates value on record with id: {others[0]}",
                        [],
                    )
        return merged

    def _derive(self, odef: ObjectDef, record: dict[str, Any]) -> None:
        if odef.name == "Opportunity":
            record["IsClosed"] = record.get("StageName") in ("Closed Won", "Closed Lost")
            record["IsWon"] = record.get("StageName") == "Closed Won"
        elif odef.name == "Contact":
            record["Name"] = " ".join(p for p in (record.get("FirstName"), record.get("LastName")) if p)

    def _after_write(self, odef: ObjectDef, record: dict[str, Any]) -> None:
        """Side effects of a save: a new primary contact role demotes the others."""
        if odef.name == "OpportunityContactRole" and record.get("IsPrimary"):
            roles = self.records["OpportunityContactRole"]
            for other in [roles[i] for i in self._ext_matches(odef.name, "OpportunityId", record.get("OpportunityId"))]:
                if (
                    other["Id"] != record["Id"]
                    and not other["IsDeleted"]
                    and other.get("OpportunityId") == record.get("OpportunityId")
                    and other.get("IsPrimary")
                ):
                    self._put(odef.name, {**other, "IsPrimary": False, "SystemModstamp": self._stamp()})
