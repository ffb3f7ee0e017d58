"""The run's staging folder: the frames and JSON documents the steps hand each other.

Each step reads and writes its frames as Parquet under the run's folder, so the steps can
run as separate Airflow tasks (on separate workers) and nothing large goes through XCom.
``job.staging`` is any path-like object with ``/`` and ``open``: an Airflow
``ObjectStoragePath`` (local folder by default, ``s3://`` etc. in production) or a
``pathlib.Path`` in tests.
"""

from __future__ import annotations

import json
from json.encoder import encode_basestring_ascii
from typing import Any

import pandas as pd

from cosell_sync.pipeline.job import SyncJob
from cosell_sync.sides.base import plain

JSON_COLUMNS = {"base", "fields", "expected", "old", "new", "pc_value", "crm_value", "chosen", "value", "deferred"}


def write_frame(job: SyncJob, name: str, frame: pd.DataFrame) -> None:
    out = frame.copy()
    for column in out.columns:
        # Text and mixed columns travel as JSON text, so values keep their types (and None).
        if column in JSON_COLUMNS or out[column].dtype == object or pd.api.types.is_string_dtype(out[column]):
            out[column] = [_json_cell(v) for v in out[column]]
    folder = job.folder
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / f"{name}.parquet").open("wb") as fh:
        out.to_parquet(fh, index=False)


def _json_cell(value: Any) -> str:
    """``json.dumps(plain(value), default=str)``, with text and None (most cells) encoded
    directly: the same JSON text, without json.dumps' per-call set-up for each cell."""
    if type(value) is str:
        return encode_basestring_ascii(value)
    if value is None:
        return "null"
    return json.dumps(plain(value), default=str)


def read_frame(job: SyncJob, name: str) -> pd.DataFrame:
    with (job.folder / f"{name}.parquet").open("rb") as fh:
        frame = pd.read_parquet(fh)
    for column in frame.columns:
        if pd.api.types.is_string_dtype(frame[column]) or frame[column].dtype == object:
            frame[column] = pd.Series(_json_cells(frame[column].tolist()), index=frame.index, dtype=object)
    return frame


def _json_cells(cells: list[Any]) -> list[Any]:
    """Each cell's JSON text decoded (anything else is None): the whole column in one parse,
    one cell at a time only if some cell is not valid JSON (then that cell fails, named)."""
    texts = [c if isinstance(c, str) else "null" for c in cells]
    try:
        decoded = json.loads("[" + ",".join(texts) + "]")
        if len(decoded) == len(cells):
            return decoded
    except ValueError:
        pass
    return [json.loads(c) if isinstance(c, str) else None for c in cells]


def write_json(job: SyncJob, name: str, payload: Any) -> None:
    job.folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(payload, default=str)  # one write: json.dump's many small ones are slow on object storage
    with (job.folder / f"{name}.json").open("w") as fh:
        fh.write(text)


def read_json(job: SyncJob, name: str) -> Any:
    with (job.folder / f"{name}.json").open("r") as fh:
        return json.load(fh)


def optional_frame(job: SyncJob, name: str, columns: list[str]) -> pd.DataFrame:
    try:
        return read_frame(job, name)
    except FileNotFoundError:
        return pd.DataFrame(columns=columns)


def blank(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value) or str(value) == ""
