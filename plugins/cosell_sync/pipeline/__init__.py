"""One sync run, by verb, as dlt lays out its stages: extract -> plan -> load -> commit -> report.

======================  ================================================================
:mod:`.job`             :class:`SyncJob` (what every step knows about the run), the window
:mod:`.staging`         the frames and JSON the steps hand each other (Parquet, not XCom)
:mod:`.extract`         each side's changed records, the dead letter's retries, counterparts
:mod:`.plan`            the pure planner (:mod:`cosell_sync.engine.plan`) on the staged frames
:mod:`.load`            the plan's writes through each side (:mod:`cosell_sync.sides`)
:mod:`.commit`          links, audit, dead letter, run summary and watermarks
:mod:`.report`          the counts of a run, and its note in words
:mod:`.lease`           the CRM's lease a run holds from extract to commit
:mod:`.run`             :func:`sync`: every step in one process (event-driven runs)
======================  ================================================================

Each step is one Airflow task of ``cosell_sync_<crm>`` (``dag_factory``); the names here are
the ones the tasks call.
"""

from cosell_sync.pipeline.commit import commit
from cosell_sync.pipeline.extract import extract_crm, extract_partner_center, fetch_counterparts
from cosell_sync.pipeline.job import OVERLAP, SyncJob, initial_load_done, window, window_job
from cosell_sync.pipeline.load import load_crm, load_partner_center
from cosell_sync.pipeline.plan import load_plan, plan_run
from cosell_sync.pipeline.report import build_report, describe_skip, format_report
from cosell_sync.pipeline.run import sync
from cosell_sync.pipeline.staging import read_frame, read_json, write_frame, write_json

__all__ = [
    "OVERLAP",
    "SyncJob",
    "build_report",
    "commit",
    "describe_skip",
    "extract_crm",
    "extract_partner_center",
    "fetch_counterparts",
    "format_report",
    "initial_load_done",
    "load_crm",
    "load_partner_center",
    "load_plan",
    "plan_run",
    "read_frame",
    "read_json",
    "sync",
    "window",
    "window_job",
    "write_frame",
    "write_json",
]
