"""The DAG run note: composed from what the run's tasks reported; a person's note is kept."""

from __future__ import annotations

import pytest

from cosell_sync.notes import NOTE_LIMIT, compose, error_text, ours, scrub, truncate
from cosell_sync.pipeline import describe_skip, format_report

REPORT = {
    "pc_to_crm": {"created": 2, "updated": 1, "conflicts": 0, "failed": 0},
    "crm_to_pc": {"created": 0, "updated": 3, "conflicts": 1, "failed": 1},
    "unchanged": 7,
    "skipped": {"crm.not_flagged": 40, "partner_center.closed_unlinked": 12, "pair.terminal_referral": 1},
}


def test_report_is_a_markdown_table_with_skips_in_plain_words():
    note = format_report("cosell_sync_salesforce", REPORT, "salesforce")
    lines = note.splitlines()
    assert lines[0] == "**cosell_sync_salesforce** · 2 created, 4 updated, 1 failed"
    assert lines[2:6] == [
        "| | created | updated | conflicts | failed |",
        "|---|--:|--:|--:|--:|",
        "| Partner Center → Salesforce | 2 | 1 | 0 | 0 |",
        "| Salesforce → Partner Center | 0 | 3 | 1 | 1 |",
    ]
    assert "Unchanged: 7 linked deals." in lines
    assert '- 40 opportunities not flagged "Sync with Partner Center": only flagged ones are shared' in lines
    assert "- 12 closed referrals that were never linked: a Closed referral is not imported" in lines
    assert not any("_" in line for line in lines if line.startswith("- ")), "a skip reason left as a code word"
    dry = format_report("cosell_sync_dynamics365", REPORT | {"dry_run": True}, "dynamics365")
    assert dry.splitlines()[0] == (
        "**cosell_sync_dynamics365** · dry run: the plan only, nothing was written (2 to create, 4 to update)"
    )
    assert "| Dynamics 365 → Partner Center | 0 | 3 | 1 | 1 |" in dry.splitlines()
    assert len(note) < NOTE_LIMIT


def test_skip_keys_of_older_reports_still_read_as_words():
    assert describe_skip("not_flagged") == describe_skip("crm.not_flagged")
    assert describe_skip("something_new") == "something new"


def test_one_record_reads_in_the_singular():
    note = format_report("cosell_sync_salesforce", REPORT | {"unchanged": 1}, "salesforce")
    assert "- 1 change not written to a Closed referral (Closed is final in Partner Center)" in note.splitlines()
    assert "Unchanged: 1 linked deal." in note.splitlines()
    assert describe_skip("crm.not_flagged", 1).startswith("opportunity not flagged")


def test_skips_are_a_list_of_their_own_when_rendered():
    lines = format_report("cosell_sync_salesforce", REPORT, "salesforce").splitlines()
    at = lines.index("Skipped:")
    assert lines[at - 1] == "" and lines[at + 1] == ""  # not run into the line before as one paragraph


def test_a_failed_run_names_the_failing_task_and_its_cause_not_the_upstream_failed():
    note = compose(
        "cosell_sync_dynamics365",
        [],
        {"extract_crm": "AuthenticationError: AADSTS7000215: Invalid client secret provided."},
        failed=True,
    )
    lines = note.splitlines()
    assert lines[0] == "**cosell_sync_dynamics365** · run failed in extract_crm"
    assert "- `extract_crm`: AuthenticationError: AADSTS7000215: Invalid client secret provided." in lines
    assert "Nothing was committed by this run: the next run does the work again." in lines
    assert "plan" not in note and "load_crm" not in note
    killed = compose("cosell_sync_salesforce", [], {"load_crm": None}, failed=True)
    assert "- `load_crm`: no cause recorded (the task was stopped?); see its log" in killed.splitlines()


def test_a_cause_cannot_break_the_markdown():
    note = compose("cosell_sync_salesforce", [], {"plan": "ValueError: bad `x` | *y* <b>"}, failed=True)
    assert "- `plan`: ValueError: bad \\`x\\` \\| \\*y\\* \\<b\\>" in note.splitlines()


def test_success_notes_are_the_reports_and_nothing_to_say_is_no_note():
    assert compose("cosell_sync_salesforce", ["**cosell_sync_salesforce**\n\nreport"], {}, failed=False) == (
        "**cosell_sync_salesforce**\n\nreport"
    )
    assert compose("cosell_sync_salesforce", [], {}, failed=False) is None


def test_long_notes_are_cut_at_a_line_under_airflows_cap():
    text = "\n".join(f"| row {i} | {'x' * 40} |" for i in range(60))
    cut = truncate(text)
    assert len(cut) <= NOTE_LIMIT and cut.endswith("\n…")
    assert all(line.endswith("|") for line in cut.splitlines()[:-1])


@pytest.mark.parametrize(
    "message",
    [
        "token request failed: client_secret=hunter2-s3cret&grant_type=client_credentials",
        'body {"refresh_token": "hunter2-s3cret", "x": 1}',
        "sent Authorization: Bearer hunter2-s3cret.abc",
        "jwt eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJodW50ZXIyLXMzY3JldCJ9.c2lnbmF0dXJl leaked",
    ],
)
def test_causes_never_carry_a_credential(message):
    assert "hunter2-s3cret" not in scrub(message)
    assert "eyJzdWIiOiJodW50ZXIyLXMzY3JldCJ9" not in error_text(RuntimeError(message))
    assert error_text(RuntimeError(message)).startswith("RuntimeError: ")


def test_causes_are_one_bounded_line():
    text = error_text(ValueError("line one\nline two " + "y" * 1000))
    assert "\n" not in text and len(text) <= 300 and text.startswith("ValueError: line one line two")


def test_a_persons_note_is_never_overwritten():
    assert ours(None, "cosell_sync_salesforce")
    assert ours("**cosell_sync_salesforce** · run failed", "cosell_sync_salesforce")
    assert ours("**cosell_referral_events** · 3 webhook event(s)", "cosell_referral_events")
    assert ours("run failed in: load_crm", "cosell_sync_salesforce")  # an older version's note
    assert not ours("Paused while the CRM admin fixes the picklist", "cosell_sync_salesforce")


def test_a_note_too_long_for_airflow_is_cut_with_a_link_to_the_cosell_page():
    """Airflow stores at most 1,000 characters of a run's note: a report with many failures
    (every task failed, a long skip list) is cut at a line and ends with a link to the run's
    whole report on the Co-sell page."""
    report = REPORT | {"skipped": {f"crm.reason_number_{i}": i for i in range(60)}}
    text = format_report("cosell_sync_salesforce", report, "salesforce")
    assert len(text) > NOTE_LIMIT
    causes = {f"task_{i}": f"HTTPError: 500 Server Error for record {i} " + "x" * 80 for i in range(20)}
    run_id = "manual__2026-03-01T12:00:00+00:00"
    note = compose("cosell_sync_salesforce", [text], causes, failed=True, run_id=run_id)
    assert note is not None and len(note) <= NOTE_LIMIT
    link = "/cosell/ui/runs/cosell_sync_salesforce/manual__2026-03-01T12%3A00%3A00%2B00%3A00"
    assert note.endswith(f"[The whole report is on the Co-sell page]({link})")
    assert note.startswith("**cosell_sync_salesforce** · run failed in") and ours(note, "cosell_sync_salesforce")
    behind = compose("cosell_sync_salesforce", [text], {}, failed=False, run_id="r1", base="/airflow/")
    assert behind is not None and len(behind) <= NOTE_LIMIT
    assert behind.endswith("(/airflow/cosell/ui/runs/cosell_sync_salesforce/r1)")
    short = compose("cosell_sync_salesforce", ["**cosell_sync_salesforce** · 1 created"], {}, failed=False, run_id="r1")
    assert short == "**cosell_sync_salesforce** · 1 created"  # a note that fits is left whole, with no link


def test_a_short_known_secret_inside_a_key_name_does_not_hide_the_credential():
    """The masker replaces every known secret, even inside words: a connection whose password is
    "secret" turned "client_secret=..." into "client_***=..." before the patterns ran, and the
    credential after it stayed. The patterns run first."""
    from airflow.sdk.log import mask_secret

    mask_secret("secret")
    assert "hunter2-s3cret" not in scrub("token request failed: client_secret=hunter2-s3cret&grant_type=x")
