"""Issue 11, case 3, Dynamics 365 half: conditional Dataverse writes.

Each update PATCH carries the ``@odata.etag`` read at ``extract_crm`` as ``If-Match``. A seller
who edits the opportunity between ``extract_crm`` and ``load_crm`` makes it answer 412; the
record is re-read and re-merged: a planned field the seller changed is deferred (not
written, the seller's value stays), a planned field the seller left alone is written with the
new ETag, once, in one more ``$batch``; a second 412 or a failed re-read fails only that record.

The tests drive the runner's step functions against the sandbox through the real hook, and
read the ``If-Match`` of every ``$batch`` part from the emulator's request log.
"""

from __future__ import annotations

import re
import time

import pytest
import requests

from cosell_sync.errors import ApiError
from cosell_sync.pipeline import commit, load_plan, read_frame, read_json
from cosell_sync.sides.dynamics365 import DynamicsSide
from tests.integration.test_sync_retries import new_job, run_load_crm, run_load_pc, seed, up_to_load

CRM = "dynamics365"
API = "/api/data/v9.2"
OPPORTUNITY = re.compile(r"/opportunities\(([0-9a-fA-F-]{36})\)")
REQUEST_LINE = re.compile(r"^(GET|POST|PATCH|PUT|DELETE) (\S+) HTTP/1\.1\r\n", re.M)


# -- helpers ------------------------------------------------------------------------------------------------
def first_sync(pc, store, staging) -> None:
    seed(pc, CRM)
    job = new_job(CRM, store, staging)
    up_to_load(job, store)
    run_load_crm(job)
    run_load_pc(job)
    report = commit(job, store)
    assert report["pc_to_crm"]["failed"] == 0 and report["crm_to_pc"]["failed"] == 0, report


def open_links(pc, store, count: int) -> list[tuple[str, str]]:
    """(referral id, opportunity id) of ``count`` linked pairs whose referral and opportunity are open."""
    out = []
    links = store.get_links(CRM)
    for rid, crm_id in zip(links["referral_id"], links["crm_id"], strict=True):
        doc = pc.partner_center.referrals.get(str(rid))
        opp = pc.dynamics365.row("opportunities", str(crm_id))
        if doc and doc["status"] in ("New", "Active") and opp["statecode"] == 0:
            out.append((str(rid), str(crm_id).lower()))
    assert len(out) >= count, f"only {len(out)} open linked pairs"
    return out[:count]


def microsoft_edits_notes(pc, rid: str, notes: str) -> None:
    """A Microsoft seller changes the referral's notes (through the sandbox control plane)."""
    resp = requests.post(
        f"{pc.origin('partner_center')}/_sandbox/referrals/{rid}/microsoft-edit",
        json={"action": "update", "changes": {"details": {"notes": notes}}},
        verify=str(pc.pki.ca_cert),
        timeout=30,
    )
    resp.raise_for_status()


def etag_of(pc, crm_id: str) -> str:
    return f'W/"{pc.dynamics365.row("opportunities", crm_id)["versionnumber"]}"'


def planned(job) -> dict[str, dict]:
    """CRM id -> the fields the plan writes to it."""
    updates = load_plan(job).updates("crm")
    return {str(c).lower(): dict(f) for c, f in zip(updates["crm_id"], updates["fields"], strict=True)}


def crm_results(job) -> dict[str, dict]:
    frame = read_frame(job, "crm_results")
    return {str(r["crm_id"]).lower(): r for r in frame.to_dict("records")}


def header(headers: dict[str, str], name: str) -> str | None:
    return next((v for k, v in headers.items() if k.lower() == name.lower()), None)


def opportunity_patches(entry) -> dict[str, dict]:
    """The opportunity PATCH parts of one logged ``$batch`` request: id -> {"headers", "body"}."""
    boundary = re.search(r"boundary=([^;\s]+)", header(entry.headers, "Content-Type") or "").group(1)
    out = {}
    for part in entry.body.decode().split(f"--{boundary}"):
        line = REQUEST_LINE.search(part)
        if not line or line.group(1) != "PATCH" or not OPPORTUNITY.search(line.group(2)):
            continue
        head, _, body = part[line.end() :].partition("\r\n\r\n")
        headers = dict(h.split(": ", 1) for h in head.split("\r\n") if h)
        out[OPPORTUNITY.search(line.group(2)).group(1).lower()] = {"headers": headers, "body": body.strip()}
    return out


def patch_batches(pc) -> list[dict[str, dict]]:
    """The opportunity PATCHes of each $batch logged since the log was cleared, in order."""
    batches = [opportunity_patches(e) for e in pc.dynamics365.requests_matching("POST", f"{API}/$batch")]
    return [b for b in batches if b]


def if_match(batch: dict[str, dict], crm_id: str) -> str | None:
    return header(batch[crm_id]["headers"], "If-Match")


def prepared_run(pc, store, staging, pairs: list[tuple[str, str]], tag: str):
    """Microsoft edits the notes of every pair; a run is extracted and planned up to load_crm."""
    for n, (rid, _) in enumerate(pairs):
        microsoft_edits_notes(pc, rid, f"{tag}: Microsoft's notes {n}")
    job = new_job(CRM, store, staging)
    up_to_load(job, store)
    plan = planned(job)
    for n, (_, crm_id) in enumerate(pairs):
        assert plan.get(crm_id) == {"notes": f"{tag}: Microsoft's notes {n}"}, plan
    return job


# -- a seller edits the same field during the run -----------------------------------------------------------
def test_seller_edit_of_the_planned_field_is_deferred_not_overwritten(pc, conns, store, tmp_path):
    staging = tmp_path / "staging"
    first_sync(pc, store, staging)
    [(rid, crm_id)] = open_links(pc, store, 1)
    job = prepared_run(pc, store, staging, [(rid, crm_id)], "same")
    extracted = etag_of(pc, crm_id)
    assert read_json(job, "crm_versions")[crm_id] == extracted  # staged at extract, per opportunity

    time.sleep(1.1)  # modifiedon has whole seconds: the seller's edit is the newer one ("newest" wins)
    pc.dynamics365.edit("opportunities", crm_id, {"description": "the seller's own notes"})
    audit_before = pc.dynamics365.row("opportunities", crm_id)["cosell_audit"]
    pc.dynamics365.log.clear()
    counts = run_load_crm(job)

    assert counts["failed"] == 0, counts
    row = pc.dynamics365.row("opportunities", crm_id)
    assert row["description"] == "the seller's own notes"  # kept, not overwritten
    assert row["cosell_audit"] == audit_before  # nothing written, so nothing audited
    result = crm_results(job)[crm_id]
    assert result["ok"] and result["fields"] == {} and list(result["deferred"]) == ["notes"], result
    batches = patch_batches(pc)
    assert len(batches) == 1 and if_match(batches[0], crm_id) == extracted, batches  # no retry: nothing left

    # The run ends; the deferred field kept its base, so the next run sees both sides changed and
    # resolves it as a conflict (notes: the newest edit wins, the seller's): it reaches Microsoft.
    run_load_pc(job)
    commit(job, store)
    after = new_job(CRM, store, staging)
    up_to_load(after, store)
    conflicts = read_frame(after, "plan_conflicts")
    assert [(str(r.crm_id).lower(), r.field, r.winner) for r in conflicts.itertuples()] == [(crm_id, "notes", "crm")]
    run_load_crm(after)
    run_load_pc(after)
    commit(after, store)
    assert pc.dynamics365.row("opportunities", crm_id)["description"] == "the seller's own notes"
    assert pc.partner_center.referrals[rid]["details"]["notes"] == "the seller's own notes"


# -- a seller edits another field during the run ------------------------------------------------------------
def test_seller_edit_of_another_field_is_re_merged_and_written_with_the_new_etag(pc, conns, store, tmp_path):
    staging = tmp_path / "staging"
    first_sync(pc, store, staging)
    [(rid, crm_id)] = open_links(pc, store, 1)
    job = prepared_run(pc, store, staging, [(rid, crm_id)], "other")
    extracted = etag_of(pc, crm_id)

    pc.dynamics365.edit("opportunities", crm_id, {"name": "Renamed by the seller", "estimatedvalue": 4321})
    reread = etag_of(pc, crm_id)
    pc.dynamics365.log.clear()
    counts = run_load_crm(job)

    assert counts["failed"] == 0, counts
    row = pc.dynamics365.row("opportunities", crm_id)
    assert row["description"] == "other: Microsoft's notes 0"  # the planned field is written
    assert row["name"] == "Renamed by the seller" and row["estimatedvalue"] == 4321  # the seller's edit stays
    result = crm_results(job)[crm_id]
    assert result["ok"] and result["fields"] == {"notes": "other: Microsoft's notes 0"}, result
    assert list(result["deferred"]) == [], result
    assert result["etag"] == etag_of(pc, crm_id)
    batches = patch_batches(pc)
    assert len(batches) == 2, batches
    assert if_match(batches[0], crm_id) == extracted  # the ETag read at extract: 412
    assert if_match(batches[1], crm_id) == reread  # the retry: the ETag of the re-read
    assert '"description":"other: Microsoft' in batches[1][crm_id]["body"]
    assert "Renamed by the seller" not in batches[1][crm_id]["body"]


# -- several records in one update --------------------------------------------------------------------------
def test_only_the_changed_records_are_retried_in_one_more_batch(pc, conns, store, tmp_path):
    """Three records in one update: A's planned field was edited by the seller (deferred), B
    got an edit of another field (retried), C is untouched (written by the first batch)."""
    staging = tmp_path / "staging"
    first_sync(pc, store, staging)
    pairs = open_links(pc, store, 3)
    (_, a), (_, b), (_, c) = pairs
    job = prepared_run(pc, store, staging, pairs, "three")
    extracted = {crm_id: etag_of(pc, crm_id) for _, crm_id in pairs}
    assert {k: v for k, v in read_json(job, "crm_versions").items() if k in extracted} == extracted

    pc.dynamics365.edit("opportunities", a, {"description": "A: the seller's notes"})
    pc.dynamics365.edit("opportunities", b, {"name": "B: renamed by the seller"})
    reread_b = etag_of(pc, b)
    pc.dynamics365.log.clear()
    counts = run_load_crm(job)

    assert counts["failed"] == 0, counts
    batches = patch_batches(pc)
    assert len(batches) == 2, batches
    first, retry = batches
    assert {a, b, c} <= set(first) and {k: if_match(first, k) for k in (a, b, c)} == extracted
    assert set(retry) == {b} and if_match(retry, b) == reread_b  # one more batch, only the re-merged record
    rows = {k: pc.dynamics365.row("opportunities", k) for k in (a, b, c)}
    assert rows[a]["description"] == "A: the seller's notes"
    assert rows[b]["description"] == "three: Microsoft's notes 1" and rows[b]["name"] == "B: renamed by the seller"
    assert rows[c]["description"] == "three: Microsoft's notes 2"
    results = crm_results(job)
    assert results[a]["fields"] == {} and list(results[a]["deferred"]) == ["notes"]
    assert results[b]["fields"] == {"notes": "three: Microsoft's notes 1"} and list(results[b]["deferred"]) == []
    assert results[c]["fields"] == {"notes": "three: Microsoft's notes 2"} and list(results[c]["deferred"]) == []
    assert all(results[k]["ok"] for k in (a, b, c)), results


# -- a 412 that repeats, a re-read that fails ---------------------------------------------------------------
@pytest.mark.parametrize("race", ["edit_again", "reread_fails"])
def test_a_second_412_or_a_failed_re_read_fails_the_record_not_the_task(pc, conns, store, tmp_path, monkeypatch, race):
    staging = tmp_path / "staging"
    first_sync(pc, store, staging)
    pairs = open_links(pc, store, 2)
    (rid, crm_id), (_, other) = pairs
    job = prepared_run(pc, store, staging, pairs, race)
    pc.dynamics365.edit("opportunities", crm_id, {"name": "Renamed by the seller"})

    real_extract = DynamicsSide.extract

    def racing_extract(self, **kwargs):
        if kwargs.get("crm_ids") is None:
            return real_extract(self, **kwargs)
        if race == "reread_fails":
            raise ApiError("Dataverse", "the re-read failed (injected)")
        records = real_extract(self, **kwargs)
        pc.dynamics365.edit("opportunities", crm_id, {"estimatedvalue": 999})  # the seller saves again
        return records

    monkeypatch.setattr(DynamicsSide, "extract", racing_extract)
    pc.dynamics365.log.clear()
    counts = run_load_crm(job)  # never raises

    assert counts == {"ok": 1, "failed": 1}, counts
    results = crm_results(job)
    assert not results[crm_id]["ok"], results[crm_id]
    expected_error = "412 twice" if race == "edit_again" else "re-reading after 412: Dataverse failed"
    assert expected_error in results[crm_id]["error"], results[crm_id]
    assert results[other]["ok"] and results[other]["fields"] == {"notes": f"{race}: Microsoft's notes 1"}
    row = pc.dynamics365.row("opportunities", crm_id)
    assert row["description"] != f"{race}: Microsoft's notes 0" and row["name"] == "Renamed by the seller"
    assert len(patch_batches(pc)) == (2 if race == "edit_again" else 1)

    monkeypatch.setattr(DynamicsSide, "extract", real_extract)
    run_load_pc(job)
    commit(job, store)
    dead = store.dead_letter(CRM)
    keys = {str(k).lower() for k in dead["record_key"]}
    assert rid.lower() in keys or crm_id in keys, dead  # dead-lettered, retried by the next run


# -- the close action after a re-merge ----------------------------------------------------------------------
@pytest.mark.parametrize("seller", ["renames", "closes_as_lost"])
def test_win_runs_only_when_the_stage_is_still_written_after_a_412(pc, conns, store, tmp_path, seller):
    """Microsoft wins the referral: the plan closes the opportunity as won. A seller who renamed
    it meanwhile does not stop that (412, re-merge, retry, WinOpportunity); a seller who closed
    it as lost meanwhile does (the stage is deferred: no write, no WinOpportunity)."""
    staging = tmp_path / "staging"
    first_sync(pc, store, staging)
    [(rid, crm_id)] = open_links(pc, store, 1)
    resp = requests.post(
        f"{pc.origin('partner_center')}/_sandbox/referrals/{rid}/microsoft-edit",
        json={"action": "accept"} if pc.partner_center.referrals[rid]["status"] == "New" else {"action": "update"},
        verify=str(pc.pki.ca_cert),
        timeout=30,
    )
    resp.raise_for_status()
    resp = requests.post(
        f"{pc.origin('partner_center')}/_sandbox/referrals/{rid}/microsoft-edit",
        json={"action": "win"},
        verify=str(pc.pki.ca_cert),
        timeout=30,
    )
    resp.raise_for_status()
    job = new_job(CRM, store, staging)
    up_to_load(job, store)
    assert planned(job).get(crm_id) == {"stage": "won"}, planned(job)

    if seller == "renames":
        pc.dynamics365.edit("opportunities", crm_id, {"name": "Renamed by the seller"})
    else:
        pc.dynamics365.edit("opportunities", crm_id, {"statecode": 2, "statuscode": 4})
    pc.dynamics365.log.clear()
    counts = run_load_crm(job)

    assert counts["failed"] == 0, counts
    result = crm_results(job)[crm_id]
    row = pc.dynamics365.row("opportunities", crm_id)
    wins = pc.dynamics365.requests_matching("POST", f"{API}/WinOpportunity")
    if seller == "renames":
        assert result["ok"] and result["fields"] == {"stage": "won"} and list(result["deferred"]) == [], result
        assert result["action"] == "win"
        assert row["statecode"] == 1 and row["name"] == "Renamed by the seller"
        assert len(wins) == 1 and len(patch_batches(pc)) == 2
    else:
        assert result["ok"] and result["fields"] == {} and list(result["deferred"]) == ["stage"], result
        assert result["action"] == "update"
        assert row["statecode"] == 2 and not wins
        assert len(patch_batches(pc)) == 1


# -- a retried load_crm -------------------------------------------------------------------------------------
def test_a_retried_load_crm_does_not_write_again_and_the_next_run_is_quiet(pc, conns, store, tmp_path):
    """Airflow retries load_crm after its writes landed: the extract ETag no longer matches, the
    re-read finds the planned value already there (not what was expected), so nothing is written
    twice; the next run reads both sides equal and writes nothing."""
    staging = tmp_path / "staging"
    first_sync(pc, store, staging)
    [(rid, crm_id)] = open_links(pc, store, 1)
    job = prepared_run(pc, store, staging, [(rid, crm_id)], "retried")
    assert run_load_crm(job)["failed"] == 0
    written = pc.dynamics365.row("opportunities", crm_id)
    assert written["description"] == "retried: Microsoft's notes 0"

    pc.dynamics365.log.clear()
    again = run_load_crm(job)  # the retry
    assert again["failed"] == 0, again
    assert len(patch_batches(pc)) == 1  # the conditional PATCH (412), and no second write
    assert pc.dynamics365.row("opportunities", crm_id)["versionnumber"] == written["versionnumber"]
    result = crm_results(job)[crm_id]
    assert result["ok"] and result["fields"] == {} and list(result["deferred"]) == ["notes"], result
    run_load_pc(job)
    commit(job, store)

    after = new_job(CRM, store, staging)
    up_to_load(after, store)
    assert crm_id not in planned(after)
    pc.dynamics365.log.clear()
    run_load_crm(after)
    run_load_pc(after)
    commit(after, store)
    assert not patch_batches(pc)
    assert pc.dynamics365.row("opportunities", crm_id)["versionnumber"] == written["versionnumber"]
