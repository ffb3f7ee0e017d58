"""Bulk API 2.0 ingest jobs (``/services/data/vNN.N/jobs/ingest``) for the Salesforce emulator.

The flow simple-salesforce's ``sf.bulk2.<Object>.insert/update/upsert/delete`` drives:
``POST jobs/ingest`` (state ``Open``), ``PUT jobs/ingest/<id>/batches`` with CSV (201),
``PATCH jobs/ingest/<id>`` ``{"state": "UploadComplete"}``, polling ``GET jobs/ingest/<id>``
(``UploadComplete`` -> ``InProgress`` -> ``JobComplete``/``Failed``; ``Aborted`` on request), then
``successfulResults`` (``"sf__Id","sf__Created",<original columns>``), ``failedResults``
(``"sf__Id","sf__Error",<original columns>``, the error as ``CODE:message:fields --``) and
``unprocessedrecords``. Rows are written with the same validation as the REST API; a header naming
an unknown field fails the whole job (``InvalidBatch : Field name not found : X``), as does data
whose line endings do not match the job's ``lineEnding``.

Processing runs on a background thread a short, configurable delay after ``UploadComplete``
(:attr:`SalesforceEmulator.bulk_delay`), so clients see the intermediate states.
"""

from __future__ import annotations

import csv
import io
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal, InvalidOperation
from typing import Any

from ..server import Request, Response
from .records import MultipleMatches, RecordError, _bad
from .soql import FieldDef, ObjectDef, normalize_id, parse_datetime, sf_datetime

OPERATIONS = ("insert", "update", "upsert", "delete", "hardDelete")
DELIMITERS = {"COMMA": ",", "TAB": "\t", "PIPE": "|", "SEMICOLON": ";", "CARET": "^", "BACKQUOTE": "`"}
LINE_ENDINGS = {"LF": "\n", "CRLF": "\r\n"}
TERMINAL = ("JobComplete", "Failed", "Aborted")
XSD = {
    "boolean": "boolean",
    "currency": "double",
    "double": "double",
    "percent": "double",
    "int": "int",
    "date": "date",
    "datetime": "dateTime",
}


@dataclass
class Job:
    id: str
    object: str
    operation: str
    external_id_field: str | None
    line_ending: str
    column_delimiter: str
    api_version: str
    created: str
    modstamp: str
    state: str = "Open"
    uploads: list[str] = field(default_factory=list)
    header: list[str] = field(default_factory=list)
    successes: list[tuple[str, bool, list[str]]] = field(default_factory=list)
    failures: list[tuple[str, str, list[str]]] = field(default_factory=list)
    unprocessed: list[list[str]] = field(default_factory=list)
    error_message: str | None = None
    processing_ms: int = 0

    def info(self, full: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "operation": self.operation,
            "object": self.object,
            "createdById": "0055g00000BqKdWAAV",
            "createdDate": self.created,
            "systemModstamp": self.modstamp,
            "state": self.state,
        }
        if self.external_id_field:
            out["externalIdFieldName"] = self.external_id_field
        out.update(
            concurrencyMode="Parallel",
            contentType="CSV",
            apiVersion=float(self.api_version),
        )
        if full:
            out["jobType"] = "V2Ingest"
        out.update(
            contentUrl=f"services/data/v{self.api_version}/jobs/ingest/{self.id}/batches",
            lineEnding=self.line_ending,
            columnDelimiter=self.column_delimiter,
        )
        if full:
            out.update(
                numberRecordsProcessed=len(self.successes) + len(self.failures),
                numberRecordsFailed=len(self.failures),
                retries=0,
                totalProcessingTime=self.processing_ms,
                apiActiveProcessingTime=self.processing_ms,
                apexProcessingTime=0,
            )
            if self.error_message:
                out["errorMessage"] = self.error_message
        return out


class _RowError(Exception):
    def __init__(self, code: str, message: str, fields: list[str]) -> None:
        super().__init__(message)
        self.text = f"{code}:{message}:{(','.join(fields) + ' ') if fields else ''}--"


class BulkIngest:
    def __init__(self, sf: Any) -> None:
        """``sf``: the :class:`~cosell_sandbox.salesforce.SalesforceEmulator` whose records the jobs write."""
        self.sf = sf
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self._generation = 0

    def reset(self) -> None:
        self.jobs.clear()
        self._generation += 1  # in-flight processing threads see it and stop

    # -- helpers -------------------------------------------------------------------------
    def _job(self, request: Request) -> Job:
        job = self.jobs.get(request.params["job"])
        if job is None:
            raise _bad("NOT_FOUND", "The requested resource does not exist", 404)
        return job

    def _touch(self, job: Job) -> None:
        job.modstamp = sf_datetime(self.sf._now())

    # -- handlers --------------------------------------------------------------------------
    def create_job(self, request: Request) -> Response:
        body, _raw = self.sf._body(request)
        if not isinstance(body, dict):
            raise _bad("INVALIDJOB", "InvalidJob : The request body must be a JSON object")
        operation = body.get("operation")
        obj = body.get("object")
        if operation not in OPERATIONS:
            raise _bad("INVALIDJOB", f"InvalidJob : Invalid operation: {operation}")
        if not obj:
            raise _bad("INVALIDJOB", "InvalidJob : Object is required")
        odef = self.sf.schema.get(str(obj))
        if odef is None:
            raise _bad("INVALIDJOB", f"InvalidJob : Unable to find object: {obj}")
        if body.get("contentType", "CSV") != "CSV":
            raise _bad("INVALIDJOB", f"InvalidJob : Invalid contentType: {body.get('contentType')}")
        line_ending = body.get("lineEnding", "LF")
        delimiter = body.get("columnDelimiter", "COMMA")
        if line_ending not in LINE_ENDINGS:
            raise _bad("INVALIDJOB", f"InvalidJob : Invalid lineEnding: {line_ending}")
        if delimiter not in DELIMITERS:
            raise _bad("INVALIDJOB", f"InvalidJob : Invalid columnDelimiter: {delimiter}")
        ext = body.get("externalIdFieldName")
        if operation == "upsert":
            if not ext:
                raise _bad(
                    "INVALIDJOB",
                    f"InvalidJob : External ID was blank for {odef.name}. An External ID must be specified for upsert.",
                )
            fdef = odef.field(str(ext))
            if fdef is None or not (fdef.external_id or fdef.name == "Id"):
                raise _bad(
                    "INVALIDJOB",
                    f"InvalidJob : The field name provided, {ext} is not an External ID or indexed field for "
                    f"{odef.name}",
                )
            ext = fdef.name
        else:
            ext = None
        with self.sf.lock:
            now = sf_datetime(self.sf._now())
            job = Job(
                id=self.sf._new_id("750"),
                object=odef.name,
                operation=operation,
                external_id_field=ext,
                line_ending=line_ending,
                column_delimiter=delimiter,
                api_version=request.params["version"],
                created=now,
                modstamp=now,
            )
            self.jobs[job.id] = job
            return Response.json(job.info(full=False))

    def list_jobs(self, request: Request) -> Response:
        with self.sf.lock:
            return Response.json(
                {"done": True, "records": [j.info(full=False) for j in self.jobs.values()], "nextRecordsUrl": None}
            )

    def get_job(self, request: Request) -> Response:
        with self.sf.lock:
            return Response.json(self._job(request).info())

    def upload(self, request: Request) -> Response:
        with self.sf.lock:
            job = self._job(request)
            if job.state != "Open":
                raise _bad("INVALIDJOBSTATE", f"Job with id {job.id} is not in the Open state", 409)
            if not request.body:
                raise _bad("INVALIDJOB", "InvalidJob : No content to upload")
            try:
                text = request.body.decode("utf-8-sig")
            except UnicodeDecodeError:
                raise _bad("INVALIDJOB", "InvalidJob : The CSV data must be UTF-8 encoded") from None
            job.uploads.append(text)
            self._touch(job)
        return Response.empty(201)

    def patch_job(self, request: Request) -> Response:
        body, _raw = self.sf._body(request)
        state = body.get("state") if isinstance(body, dict) else None
        with self.sf.lock:
            job = self._job(request)
            if state == "UploadComplete":
                if job.state != "Open":
                    raise _bad("INVALIDJOBSTATE", f"Closing already {job.state} Job not allowed", 409)
                job.state = "UploadComplete"
                self._touch(job)
                generation = self._generation
                threading.Thread(
                    target=self._process, args=(job, generation), name=f"bulk-{job.id}", daemon=True
                ).start()
            elif state == "Aborted":
                if job.state in TERMINAL:
                    raise _bad(
                        "INVALIDJOBSTATE", f"Aborting already {job.state.replace('Job', '')} Job not allowed", 409
                    )
                job.state = "Aborted"
                self._touch(job)
            else:
                raise _bad("INVALIDJOBSTATE", f"Invalid state: {state}. Use UploadComplete or Aborted.")
            return Response.json(job.info(full=False))

    def delete_job(self, request: Request) -> Response:
        with self.sf.lock:
            job = self._job(request)
            if job.state not in ("UploadComplete", *TERMINAL):
                raise _bad("INVALIDJOBSTATE", f"Deleting a job in state {job.state} is not allowed", 409)
            del self.jobs[job.id]
        return Response.empty(204)

    def results(self, request: Request) -> Response:
        kind = request.params["kind"].lower()
        with self.sf.lock:
            job = self._job(request)
            buf = io.StringIO()
            writer = csv.writer(
                buf,
                delimiter=DELIMITERS[job.column_delimiter],
                lineterminator=LINE_ENDINGS[job.line_ending],
                quoting=csv.QUOTE_MINIMAL,
            )
            dl = DELIMITERS[job.column_delimiter]
            le = LINE_ENDINGS[job.line_ending]
            header = job.header or self._first_header(job)
            if kind == "successfulresults":
                buf.write(dl.join(['"sf__Id"', '"sf__Created"', *self._cells(header, dl)]) + le)
                for record_id, created, row in job.successes:
                    buf.write(dl.join([f'"{record_id}"', f'"{str(created).lower()}"', *self._cells(row, dl)]) + le)
            elif kind == "failedresults":
                buf.write(dl.join(['"sf__Id"', '"sf__Error"', *self._cells(header, dl)]) + le)
                for record_id, error, row in job.failures:
                    quoted = '"' + error.replace('"', '""') + '"'
                    buf.write(dl.join([f'"{record_id}"', quoted, *self._cells(row, dl)]) + le)
            else:
                writer.writerow(header)
                writer.writerows(job.unprocessed)
        resp = Response(200, buf.getvalue().encode("utf-8"))
        resp.headers.set("Content-Type", "text/csv")
        return resp

    @staticmethod
    def _cells(values: list[str], delimiter: str) -> list[str]:
        buf = io.StringIO()
        csv.writer(buf, delimiter=delimiter, lineterminator="", quoting=csv.QUOTE_MINIMAL).writerow(values)
        return [buf.getvalue()] if values else []

    def _first_header(self, job: Job) -> list[str]:
        if not job.uploads:
            return []
        reader = csv.reader(io.StringIO(job.uploads[0]), delimiter=DELIMITERS[job.column_delimiter])
        return next(reader, [])

    # -- processing ---------------------------------------------------------------------------
    def _process(self, job: Job, generation: int) -> None:
        time.sleep(self.sf.bulk_delay)
        with self.sf.lock:
            if generation != self._generation or job.state != "UploadComplete":
                return
            job.state = "InProgress"
            self._touch(job)
        time.sleep(self.sf.bulk_delay)
        with self.sf.lock:
            if generation != self._generation or job.state != "InProgress":
                return
            started = time.monotonic()
            try:
                self._run(job)
            except Exception as exc:  # an emulator bug must not leave the job hanging forever
                job.state = "Failed"
                job.error_message = f"Unknown : {type(exc).__name__}"
            job.processing_ms = int((time.monotonic() - started) * 1000)
            self._touch(job)

    def _parse(self, job: Job) -> tuple[list[str], list[list[str]]] | str:
        """(header, rows) of all uploads, or the job failure message."""
        dl = DELIMITERS[job.column_delimiter]
        header: list[str] = []
        rows: list[list[str]] = []
        if not job.uploads:
            return "InvalidBatch : Records not processed : no data was uploaded"
        for text in job.uploads:
            first = text.find("\n")
            if first >= 0:
                crlf = first > 0 and text[first - 1] == "\r"
                if crlf != (job.line_ending == "CRLF"):
                    return (
                        "ClientInputError : LineEnding is invalid on user data. Current LineEnding setting is "
                        + job.line_ending
                    )
            reader = csv.reader(io.StringIO(text, newline=""), delimiter=dl, strict=True)
            try:
                parsed = [row for row in reader if row != []]
            except csv.Error as exc:
                return f"ClientInputError : Unable to parse CSV data: {exc}"
            if not parsed:
                continue
            if not header:
                header = parsed[0]
            elif [h.strip().lower() for h in parsed[0]] != [h.strip().lower() for h in header]:
                return "InvalidBatch : The header of every upload must match the first upload"
            rows.extend(parsed[1:])
        if not header:
            return "InvalidBatch : Records not processed : no data was uploaded"
        return header, rows

    def _run(self, job: Job) -> None:
        odef = self.sf.schema.objects[job.object]
        parsed = self._parse(job)
        if isinstance(parsed, str):
            job.state = "Failed"
            job.error_message = parsed
            job.header = self._first_header(job)
            return
        header, rows = parsed
        job.header = header
        columns: list[FieldDef] = []
        for name in header:
            fdef = odef.field(name.strip())
            if fdef is None:
                job.state = "Failed"
                job.error_message = f"InvalidBatch : Field name not found : {name.strip()}"
                job.unprocessed = rows
                return
            columns.append(fdef)
        for row in rows:
            if len(row) != len(columns):
                job.failures.append(("", "INVALID_FIELD:Row has a different number of columns than the header:--", row))
                continue
            try:
                record_id, created = self._apply(job, odef, columns, row)
            except _RowError as err:
                job.failures.append((self._row_id(columns, row), err.text, row))
            else:
                job.successes.append((record_id, created, row))
        job.state = "JobComplete"

    @staticmethod
    def _row_id(columns: list[FieldDef], row: list[str]) -> str:
        for fdef, raw in zip(columns, row, strict=True):
            if fdef.name == "Id":
                return normalize_id(raw.strip()) or ""
        return ""

    def _values(self, columns: list[FieldDef], row: list[str]) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for index, (fdef, raw) in enumerate(zip(columns, row, strict=True)):
            if raw == "":
                continue  # blank: leave the field as it is (insert: not set)
            if raw == "#N/A":
                values[fdef.name] = False if fdef.type == "boolean" else None
                continue
            values[fdef.name] = self._convert(fdef, raw, index + 1)
        return values

    @staticmethod
    def _convert(fdef: FieldDef, raw: str, column: int) -> Any:
        def fail() -> _RowError:
            return _RowError(
                "INVALID_FIELD",
                f"Failed to deserialize field at col {column}. Due to, '{raw}' is not a valid value for the type "
                f"xsd:{XSD.get(fdef.type, 'string')}",
                [fdef.name],
            )

        ftype = fdef.type
        if ftype == "boolean":
            lowered = raw.strip().lower()
            if lowered in ("true", "1", "yes"):
                return True
            if lowered in ("false", "0", "no"):
                return False
            raise fail()
        if ftype in ("currency", "double", "percent", "int"):
            try:
                number = Decimal(raw.strip())
            except InvalidOperation:
                raise fail() from None
            if not number.is_finite() or (ftype == "int" and number != number.to_integral_value()):
                raise fail()
            return number
        if ftype == "date":
            if re.fullmatch(r"\d{4}-\d{2}-\d{2}", raw.strip()):
                try:
                    return date.fromisoformat(raw.strip()).isoformat()
                except ValueError:
                    pass
            raise fail()
        if ftype == "datetime":
            try:
                return sf_datetime(parse_datetime(raw))
            except ValueError:
                raise fail() from None
        return raw

    def _apply(self, job: Job, odef: ObjectDef, columns: list[FieldDef], row: list[str]) -> tuple[str, bool]:
        sf = self.sf
        try:
            values = self._values(columns, row)
            if job.operation == "insert":
                return sf.create_record(odef.name, values)["Id"], True
            if job.operation in ("update", "delete", "hardDelete"):
                raw_id = values.pop("Id", None)
                if not raw_id:
                    raise _RowError("MISSING_ARGUMENT", f"Id not specified in an {job.operation} call", [])
                record_id = sf._resolve_record_id(odef, str(raw_id), rest=False)
                if job.operation == "update":
                    sf.update_record(odef.name, record_id, values)
                elif job.operation == "delete":
                    sf._delete_cascade(odef.name, record_id)
                else:
                    sf.purge_record(odef.name, record_id)
                return record_id, False
            assert job.external_id_field is not None
            ext_field = job.external_id_field
            ext_value = values.get(ext_field)
            if ext_value is None:
                raise _RowError("MISSING_ARGUMENT", f"{ext_field} not specified", [ext_field])
            if ext_field == "Id":
                record_id = sf._resolve_record_id(odef, str(ext_value), rest=False)
                sf.update_record(odef.name, record_id, {k: v for k, v in values.items() if k != "Id"})
                return record_id, False
            try:
                record, created = sf.upsert_record(odef.name, ext_field, ext_value, values)
            except MultipleMatches as multi:
                fdef = odef.fields[ext_field]
                raise _RowError(
                    "DUPLICATE_EXTERNAL_ID",
                    f"{fdef.label}: more than one record found for external id field: [{', '.join(multi.ids)}]",
                    [ext_field],
                ) from None
            return record["Id"], created
        except RecordError as err:
            raise _RowError(err.code, err.message, err.fields) from None
