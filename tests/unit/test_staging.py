"""The staging area between a run's tasks: frames and JSON round-trip exactly, and staged JSON
goes out in one write (an ObjectStoragePath handle makes every small write costly)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from cosell_sync import pipeline as runner
from cosell_sync.engine.mapping import load_mapping


def _job(staging: Any) -> runner.SyncJob:
    return runner.SyncJob(
        crm="salesforce",
        dag_id="cosell_sync_salesforce",
        run_id="manual__staging",
        mapping=load_mapping("salesforce"),
        staging=staging,
    )


TRICKY = [
    None,
    math.nan,
    "",
    "a, b], [c",
    'quote " and \\ backslash',
    "emoji 🚀 and é",
    "line\nbreak",
    {"nested": [1, {"x": None}]},
    [1, 2],
    3,
    2.5,
    True,
    False,
]


def test_frames_round_trip_every_value_kind(tmp_path: Path):
    job = _job(tmp_path)
    frame = pd.DataFrame({"value": pd.Series(TRICKY, dtype=object), "n": range(len(TRICKY))})
    runner.write_frame(job, "tricky", frame)
    back = runner.read_frame(job, "tricky")
    want = [None if isinstance(v, float) and math.isnan(v) else v for v in TRICKY]
    assert list(back["value"]) == want
    assert [type(v) for v in back["value"]] == [type(v) for v in want]
    assert list(back["n"]) == list(range(len(TRICKY)))


def test_a_cell_that_is_not_json_is_refused(tmp_path: Path):
    job = _job(tmp_path)
    job.folder.mkdir(parents=True)
    pd.DataFrame({"value": ['"fine"', "1,2", "3"]}).to_parquet(job.folder / "bad.parquet", index=False)
    with pytest.raises(ValueError):  # never read as more (or fewer) values than cells
        runner.read_frame(job, "bad")


class _CountingFile:
    def __init__(self, writes: list[int]) -> None:
        self.writes = writes

    def write(self, text: str) -> int:
        self.writes.append(len(text))
        return len(text)

    def __enter__(self) -> _CountingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class _CountingPath:
    """A stand-in for an ObjectStoragePath: counts the writes made through its handles."""

    def __init__(self, writes: list[int]) -> None:
        self.writes = writes

    def __truediv__(self, other: str) -> _CountingPath:
        return self

    def mkdir(self, **kwargs: object) -> None:
        return None

    def open(self, mode: str = "r") -> _CountingFile:
        return _CountingFile(self.writes)


def test_staged_json_goes_out_in_one_write():
    writes: list[int] = []
    payload = {str(i): {"id": i, "name": f"referral {i}", "tags": ["a", "b"]} for i in range(2000)}
    runner.write_json(_job(_CountingPath(writes)), "docs", payload)
    assert len(writes) == 1 and writes[0] > 50_000
