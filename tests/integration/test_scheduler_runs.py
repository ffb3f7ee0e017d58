"""The sync DAGs and the event DAG, run to completion by a real scheduler, as ``make airflow``
and production run them: separate ``scheduler``, ``dag-processor``, ``api-server`` and
``triggerer`` processes (LocalExecutor, SQLite), the state DB at its default place under
``$AIRFLOW_HOME`` and the Dynamics connection in Airflow's metadata DB (as one made in the UI).

Runs, on both CRMs:

* scheduled runs before the initial load wait for it (skipped, with a note saying so);
* a manual dry run plans and writes nothing;
* a run with a bad client secret fails at ``prepare`` (which reads the org's choice options), and
  its note names that task and the cause (``AADSTS7000215``), not the upstream-failed tasks, and
  never the secret;
* manual real runs (the initial load), then a scheduled run that really syncs.

Every run ends on its own, the scheduler is alive at the end and never logged a detached
ORM object, and every finished run has its note.

Elsewhere, not repeated here (each real run costs this test some 20-30 s, and the schedule
starts another every minute beside it): a run with ``referral_ids`` and a misspelt conf key
(``test_sync_dags``, ``test_dags``: the same DAG code in one process), and the event DAG
under this same topology, from the webhook on (``test_webhooks_end_to_end``).
"""

from __future__ import annotations

import os

import pytest

from cosell_sandbox.airflow_cluster import AirflowCluster
from cosell_sync.state import StateStore

# Real Airflow components, a cluster of its own (a schedule every minute, the Dynamics connection in the
# metadata DB): `make test` runs the tests of one lane ("airflow-cluster-b") one after another on one
# xdist worker, so at most two clusters (one per lane) run at once, beside the rest of the suite.
pytestmark = pytest.mark.xdist_group("airflow-cluster-b")
SF, DYN = "cosell_sync_salesforce", "cosell_sync_dynamics365"
BAD_SECRET = "not-the-secret-7f3a9c"


def crm_writes(pc) -> int:
    return sum(
        1
        for emulator in (pc.salesforce, pc.dynamics365)
        for r in emulator.requests_matching()
        if r.method in ("POST", "PATCH", "PUT", "DELETE") and not r.path.startswith("/_sandbox/")
    )


@pytest.mark.timeout(1200)
def test_sync_and_event_dags_run_to_completion_under_a_real_scheduler(pc, pc_conn, sf_conn, tmp_path):
    pc.partner_center.seed(24, seed=31)
    pc.salesforce.seed(opportunities=9, accounts=3, flagged=4, seed=31)
    pc.dynamics365.seed(opportunities=9, accounts=3, flagged=4, seed=31)
    dynamics = pc.connections()["dynamics365_default"]
    env = {k: v for k, v in os.environ.items() if k.startswith("AIRFLOW_CONN_")}
    env.pop("AIRFLOW_CONN_COSELL_STATE", None)  # the default state DB, as `make airflow` has it
    env.pop("AIRFLOW_CONN_DYNAMICS365_DEFAULT", None)  # in the metadata DB instead, as the UI makes it
    env |= {
        "AIRFLOW__COSELL__SYNC_SCHEDULE": "* * * * *",  # a scheduled run every minute, so the test sees some
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
    }
    home = tmp_path / "airflow"
    with AirflowCluster(home, env) as af:
        for dag_id in (SF, DYN):
            af.wait_for(lambda dag_id=dag_id: af.dag_serialized(dag_id), 180, f"{dag_id} to be parsed")
        bad = dynamics | {"password": BAD_SECRET}
        af.set_connection("dynamics365_default", bad)

        # Unpausing starts the schedule: with no initial load yet, its runs wait and say why.
        pc.salesforce.log.clear()
        pc.dynamics365.log.clear()
        af.unpause(SF)
        af.unpause(DYN)
        scheduled = af.wait_for(
            lambda: [r for r in af.dag_runs(SF) if r["run_type"] == "scheduled"], 120, "a scheduled run"
        )[0]
        waiting = af.finished(SF, scheduled["run_id"])
        assert waiting["state"] == "success", waiting
        assert waiting["note"].startswith(f"**{SF}** · waiting for the initial load"), waiting["note"]

        # A dry run (Salesforce) and a run with a bad client secret (Dynamics), side by side.
        dry_id = af.trigger(SF, {"dry_run": True})
        bad_id = af.trigger(DYN)
        dry = af.finished(SF, dry_id)
        assert dry["state"] == "success", dry
        assert dry["note"].startswith(f"**{SF}** · dry run: the plan only, nothing was written"), dry["note"]
        assert "| Partner Center → Salesforce | " in dry["note"]
        failed = af.finished(DYN, bad_id)
        assert failed["state"] == "failed"
        note = failed["note"]
        assert note.startswith(f"**{DYN}** · run failed"), note
        # prepare checks the mapping's choices against the org first: a bad secret stops the run there.
        assert "`prepare`" in note and "AADSTS7000215" in note, note
        upstream_failed = [t for t, s in af.failed_tasks(DYN, bad_id).items() if s == "upstream_failed"]
        assert upstream_failed and not any(f"`{t}`" in note for t in upstream_failed), note
        assert BAD_SECRET not in note and dynamics["password"] not in note
        assert crm_writes(pc) == 0, "a dry run, a failed run and waiting scheduled runs wrote to a CRM"

        # The connection is fixed; both CRMs do their initial load through manual runs.
        af.set_connection("dynamics365_default", dynamics)
        loads = {SF: af.trigger(SF), DYN: af.trigger(DYN)}
        for dag_id, run_id in loads.items():
            run = af.finished(dag_id, run_id)
            assert run["state"] == "success", (dag_id, run)
            assert run["note"].startswith(f"**{dag_id}** · ") and " created, " in run["note"], run["note"]
        loaded_at = max(af.run(d, r)["start_date"] for d, r in loads.items())
        store = StateStore(f"sqlite:///{home / 'cosell_state.db'}")
        links = store.get_links("salesforce")
        assert len(links) and len(store.get_links("dynamics365"))

        # Now the schedule syncs for real: a scheduled run started after the initial load.
        def a_real_scheduled_run() -> dict | None:
            for r in af.dag_runs(SF):
                run = af.run(SF, r["run_id"])
                if r["run_type"] == "scheduled" and run["start_date"] and run["start_date"] > loaded_at:
                    return run
            return None

        later = af.wait_for(a_real_scheduled_run, 180, "a scheduled run after the initial load", interval=2)
        later = af.finished(SF, later["run_id"])
        assert later["state"] == "success", later
        assert later["note"].startswith(f"**{SF}** · ") and " created, " in later["note"], later

        # Every finished run has its note; the scheduler is alive and never lost an ORM object.
        rows = af.query(
            "select r.dag_id, r.run_id, r.state, n.content from dag_run r left join dag_run_note n"
            " on n.dag_run_id = r.id where r.state in ('success', 'failed')"
        )
        assert len(rows) >= 6
        missing = [(d, r) for d, r, _, content in rows if not content]
        if missing:  # a run that has just finished may still be getting its note
            for dag_id, run_id in missing:
                af.finished(dag_id, run_id, timeout=30)
        assert all(len(content or "") <= 1000 for *_, content in rows)
        assert af.procs["scheduler"].poll() is None, af.tail()
        scheduler_log = af.logs["scheduler"].read_text(errors="replace")
        assert "DetachedInstanceError" not in scheduler_log
        assert "could not write the note" not in scheduler_log
        store.close()
