"""The Airflow UI as a user works in it (SPEC §9, issue 15): Debian's Chromium, driven by
Playwright, against a real API server, scheduler, DAG processor and triggerer on the sandbox.

Every step is done the way a user does it, by clicking and typing in the browser; the test
reads Airflow's metadata DB only to explain a failure. The user:

a. signs in through Airflow's login page (the simple auth manager, a real user and password);
b. opens ``cosell_sync_salesforce``, triggers it through its params form with ``dry_run``
   switched on, and reads the dry-run report in the run's note;
c. (anonymous, no cookies) the Co-sell page and its JSON API are refused, the public webhook
   receiver is not;
d. runs a real sync in which one referral (currency "XYZ") lands in the dead letter, sees it
   on the Co-sell page with its error, fixes the referral in the sandbox, presses Retry now
   and sees the row cleared once that run is done, then opens the deal timeline of the pair.

Screenshots of each step are under the test's ``tmp_path / "screenshots"`` (paths printed).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from urllib.parse import unquote

import pytest
from playwright.sync_api import Browser, FrameLocator, Locator, Page, Request, Response, expect
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from cosell_sandbox.seed import iso
from tests.shared_airflow import SHARED_GROUP
from tests.ui.conftest import AirflowUI, Screens

pytestmark = pytest.mark.xdist_group(SHARED_GROUP)  # the shared real Airflow: see tests/shared_airflow.py
SF = "cosell_sync_salesforce"
PARAMS = ("dry_run", "referral_ids", "full_resync", "directions")
RUN_TIMEOUT = 240  # seconds for a sync run to end, on a machine shared with other clusters
REFUSED_REDIRECTS = (301, 302, 303, 307, 308)
# Playwright's assertions wait 5 s by default: on this 2-core machine, with another Airflow cluster
# and the rest of the suite running, the UI can take longer to render a page (a run saw the DAG
# list's four Trigger buttons, then none, while the DAG's page loaded, and gave up at 5 s). As long
# as the context's default timeout for actions (30 s).
expect.set_options(timeout=30_000)


def seed(pc) -> str:
    """A few referrals and opportunities, and one new referral whose currency is not ISO 4217
    ("XYZ"): the real sync dead-letters it. Returns its id."""
    pc.partner_center.seed(5, seed=41)
    pc.salesforce.seed(opportunities=4, accounts=2, flagged=2, seed=41)
    bad = pc.partner_center.seed(1, seed=42)[0]
    doc = pc.partner_center.referrals[bad]
    doc.update(status="New", substatus="Pending", updatedDateTime=iso(datetime.now(UTC)))
    doc["details"]["currency"] = "XYZ"
    return bad


def refresh_until(page: Page, seen: Callable[[], bool], timeout: float, what: str, why: Callable[[], str]) -> None:
    """Reload the page (as a user presses refresh) until ``seen()``; fail naming ``what`` and
    ``why()`` (the run's state, for the failure message) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if seen():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"after {timeout:.0f}s the page still does not show {what}; {why()}")
        time.sleep(3)
        try:  # the document, not every script and image ("load"): the check above waits for what it needs
            page.reload(wait_until="domcontentloaded")
        except PlaywrightTimeout:  # a loaded machine: a reload that hangs is pressed again, as a user would
            print(f"a reload of {page.url} took over 30 s; reloading again")


def visible(locator: Locator, timeout: float = 5_000) -> bool:
    try:
        locator.first.wait_for(state="visible", timeout=timeout)
        return True
    except PlaywrightTimeout:
        return False


def sign_in(page: Page, ui: AirflowUI, screens: Screens) -> None:
    page.goto("/")
    expect(page).to_have_url(re.compile(r"/auth/login"))  # anonymous: Airflow sends the user to its login page
    expect(page.get_by_label("Username")).to_be_visible()
    screens.snap(page, "login-page", "Airflow's login page, where an anonymous visitor lands")
    page.get_by_label("Username").fill(ui.username)
    page.get_by_label("Password").fill(ui.password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(lambda url: "/auth/login" not in url, timeout=60_000)
    expect(page.get_by_role("link", name="Dags", exact=True)).to_be_visible(timeout=60_000)
    screens.snap(page, "signed-in", f"Airflow's home page, signed in as {ui.username}")


class Traffic:
    """The page's requests from now on (method, path, status or "no answer yet", seconds taken),
    for a failure report: what the UI was waiting for, and what the API answered."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.started: dict[int, tuple[float, Request]] = {}
        self.ended: dict[int, float] = {}
        page.on("request", self._request)
        page.on("requestfinished", self._ended)
        page.on("requestfailed", self._ended)

    def _request(self, request: Request) -> None:
        self.started[id(request)] = (time.monotonic(), request)

    def _ended(self, request: Request) -> None:
        self.ended[id(request)] = time.monotonic()

    def stop(self) -> None:
        self.page.remove_listener("request", self._request)
        self.page.remove_listener("requestfinished", self._ended)
        self.page.remove_listener("requestfailed", self._ended)

    def report(self) -> str:
        now, lines = time.monotonic(), []
        for key, (began, request) in self.started.items():
            if "/api/" not in request.url and "/ui/" not in request.url:
                continue
            path = request.url.split("//", 1)[-1].split("/", 1)[-1]
            if key not in self.ended:
                lines.append(f"  {request.method} /{path}: no answer yet after {now - began:.1f}s")
                continue
            response = request.response() if request.failure is None else None
            status = response.status if response else f"failed ({request.failure})"
            lines.append(f"  {request.method} /{path}: {status} in {self.ended[key] - began:.1f}s")
        return "\n".join(lines) or "  (none)"


def page_messages(page: Page) -> str:
    """The toasts and alerts the page shows (Chakra's toasts, the forms' error alerts)."""
    texts = page.locator("[data-scope=toast][data-part=root], [role=alert]").all_inner_texts()
    return " | ".join(t.strip().replace("\n", " ") for t in texts if t.strip()) or "none"


def trigger_report(page: Page, ui: AirflowUI, traffic: Traffic, what: str) -> str:
    runs = ui.af.dag_runs(SF)[-3:]
    return (
        f"{what}\nthe page is at {page.url}; dialog open: {page.get_by_role('dialog').count() > 0};"
        f" toasts/alerts: {page_messages(page)}\nits requests since the click:\n{traffic.report()}\n"
        f"the last runs of {SF} in Airflow: {[(r['run_id'], r['run_type'], r['state']) for r in runs]}"
    )


def trigger_through_form(page: Page, ui: AirflowUI, screens: Screens, *, dry_run: bool, step: str) -> str:
    """From the DAG list: open the DAG, open its Trigger form, set ``dry_run``, trigger.
    Returns the new run's id (the run page the UI goes to)."""
    page.get_by_role("link", name="Dags", exact=True).click()
    page.get_by_role("link", name=SF, exact=True).first.click()
    expect(page).to_have_url(re.compile(rf"/dags/{SF}"))
    trigger = page.get_by_role("button", name="Trigger Dag")
    expect(trigger).to_have_count(1)  # the DAG's page, no longer the list (one Trigger button a DAG)
    trigger.click()
    form = page.get_by_role("dialog")
    expect(form).to_contain_text(f"Trigger Dag - {SF}")
    for name in PARAMS:  # the form shows the DAG's params
        expect(form.locator("label", has_text=re.compile(rf"^\s*{name}\b"))).to_be_visible()
    switch = form.locator("input[name=element_dry_run]")
    expect(switch).not_to_be_checked()  # the param's default
    if dry_run:
        form.locator("label:has(input[name=element_dry_run])").click()  # the switch
        expect(switch).to_be_checked()
    screens.snap(page, f"{step}-trigger-form", f"the params form of {SF}, dry_run {'on' if dry_run else 'off'}")
    traffic = Traffic(page)
    try:
        # The form POSTs the run, then (the DAG being paused) unpauses it; the UI goes to the run's
        # page only once it has refetched the DAG's run lists and grid: on a loaded machine, several
        # requests to one busy API server. So: the POST's answer first (the run's id, or the API's
        # error), then that run's page, each with a report of the page and its requests if missing.
        with page.expect_response(is_trigger_post, timeout=60_000) as posted:
            form.get_by_role("button", name="Trigger", exact=True).click()
        answer = posted.value
        if answer.status != 200:
            failed = f"the trigger POST failed: {answer.status} {answer.text()[:500]}"
            raise AssertionError(trigger_report(page, ui, traffic, failed))
        run_id = answer.json()["dag_run_id"]
        page.wait_for_url(
            lambda url: unquote(url.split("?", 1)[0]).endswith(f"/dags/{SF}/runs/{run_id}"), timeout=120_000
        )
    except PlaywrightTimeout as exc:
        raise AssertionError(
            trigger_report(page, ui, traffic, f"Trigger pressed: {exc.message.splitlines()[0]}")
        ) from None
    finally:
        traffic.stop()
    print(f"{step}: Trigger pressed, {run_id}'s page reached; the page's requests meanwhile:\n{traffic.report()}")
    expect(page.get_by_text("Dag Run Triggered").last).to_be_visible()  # the toast
    return run_id


def is_trigger_post(response: Response) -> bool:
    return response.request.method == "POST" and response.url.split("?", 1)[0].endswith(f"/dags/{SF}/dagRuns")


def run_note(page: Page) -> Locator:
    """The run's note on its run page, rendered from Markdown: it begins with the DAG id in bold."""
    return page.locator("p", has=page.locator("strong", has_text=SF)).filter(has_text=f"{SF} · ")


def cosell_frame(page: Page) -> FrameLocator:
    """The Co-sell page, which Airflow shows in an iframe under its own navigation."""
    return page.frame_locator("iframe").first


def dead_letter_row(frame: FrameLocator, record: str) -> Locator:
    return frame.locator("#dead-letter-table tr", has_text=record)


def anonymous_refusals(browser: Browser, ui: AirflowUI, screens: Screens) -> list[str]:
    """Step c: what a visitor without cookies gets. Returns the problems (empty when right)."""
    problems = []
    anon = browser.new_context(base_url=ui.url, ignore_https_errors=True)
    try:
        assert anon.cookies() == []
        for path in ("/cosell/ui/", "/cosell/ui/api/overview"):
            resp = anon.request.get(path, max_redirects=0)
            location = resp.headers.get("location", "")
            if resp.status in (401, 403):
                continue
            if resp.status in REFUSED_REDIRECTS and "/auth/login" in location:
                continue
            problems.append(f"anonymous GET {path}: {resp.status} {location!r}, not 401/403 or a redirect to login")
        # The public webhook receiver: no login asked (a GET is the wrong method, but not refused for auth).
        resp = anon.request.get("/cosell/webhooks/partner-center", max_redirects=0)
        if resp.status in (401, 403, 404) or resp.status >= 500 or resp.status in REFUSED_REDIRECTS:
            problems.append(f"anonymous GET /cosell/webhooks/partner-center: {resp.status}, should be reachable")
        page = anon.new_page()
        page.goto("/cosell/ui/")
        screens.snap(page, "anonymous-cosell", "an anonymous visitor opening /cosell/ui/ (sent to the login page)")
        if "/auth/login" not in page.url:
            problems.append(f"an anonymous browser opening /cosell/ui/ ends at {page.url}, not the login page")
    finally:
        anon.close()
    return problems


@pytest.mark.timeout(1200)
def test_a_user_signs_in_dry_runs_the_sync_and_works_the_dead_letter(
    pc, airflow_ui: AirflowUI, browser: Browser, screens: Screens
):
    ui = airflow_ui
    bad = seed(pc)
    # The shared Airflow serves HTTPS with the sandbox's certificate, whose CA Chromium does not know.
    context = browser.new_context(base_url=ui.url, viewport={"width": 1400, "height": 1400}, ignore_https_errors=True)
    context.set_default_timeout(30_000)
    page = context.new_page()
    screens.page = page

    # a. Sign in.
    sign_in(page, ui, screens)

    # b. A dry run through the params form; its report in the run's note.
    dry_id = trigger_through_form(page, ui, screens, dry_run=True, step="dry-run")
    refresh_until(
        page,
        lambda: visible(run_note(page)),
        RUN_TIMEOUT,
        "the dry run's note",
        lambda: ui.run_state(SF, dry_id),
    )
    note = run_note(page).first.inner_text()
    assert note.startswith(f"{SF} · dry run"), note
    expect(page.get_by_text("Success", exact=True).first).to_be_visible()
    screens.snap(page, "dry-run-note", f"the dry run {dry_id}: Success, the report in its note")

    # c. Anonymous requests (checked here, asserted at the end, so step d runs whatever they show).
    anonymous_problems = anonymous_refusals(browser, ui, screens)

    # d. A real sync: the bad referral lands in the dead letter.
    real_id = trigger_through_form(page, ui, screens, dry_run=False, step="real-run")
    refresh_until(
        page, lambda: visible(run_note(page)), RUN_TIMEOUT, "the real run's note", lambda: ui.run_state(SF, real_id)
    )
    note = run_note(page).first.inner_text()
    assert " created, " in note and "dry run" not in note, note
    screens.snap(page, "real-run-note", f"the real run {real_id} and its report")

    # The Co-sell page, from Airflow's navigation.
    page.get_by_role("link", name="Co-sell").click()
    expect(page).to_have_url(re.compile(r"/plugin/cosell"))
    frame = cosell_frame(page)
    for heading in ("Overview", "Links", "Dead letter", "Conflicts"):
        expect(frame.get_by_role("heading", name=heading, exact=True)).to_be_visible()
    row = dead_letter_row(frame, bad)
    expect(row).to_have_count(1)
    for text in ("Salesforce", "Partner Center → CRM", "details.currency", "'XYZ'", real_id):
        expect(row).to_contain_text(text)
    expect(row.get_by_role("button", name="Retry now")).to_be_visible()
    expect(row.get_by_role("button", name="Dismiss")).to_be_visible()
    screens.snap(page, "dead-letter", f"the Co-sell page: referral {bad} in the dead letter, its currency error")

    # Fixed in the sandbox (as a partner would in Partner Center); Retry now syncs just that referral.
    doc = pc.partner_center.referrals[bad]
    doc["details"]["currency"] = "USD"
    doc["updatedDateTime"] = iso(datetime.now(UTC))
    row.get_by_role("button", name="Retry now").click()
    triggered = frame.get_by_text(re.compile(rf"Triggered {SF} run \S+"))
    expect(triggered).to_be_visible()
    retry_id = re.search(rf"Triggered {SF} run (\S+)", triggered.inner_text()).group(1)
    screens.snap(page, "retry-triggered", f"Retry now pressed: the Co-sell page says it triggered {retry_id}")

    salesforce_card = frame.locator(".card", has_text=f"({SF})")
    refresh_until(
        page,
        lambda: (
            frame.locator("#dead-letter-table").first.is_visible()
            and dead_letter_row(frame, bad).count() == 0
            and visible(salesforce_card.filter(has_text=f"success · {retry_id}"), 1_000)
        ),
        RUN_TIMEOUT,
        f"the dead-letter row of {bad} cleared and the run {retry_id} done",
        lambda: ui.run_state(SF, retry_id),
    )
    expect(frame.get_by_text("The dead letter is empty.")).to_be_visible()
    screens.snap(page, "dead-letter-cleared", f"after {retry_id}: the dead letter is empty")

    # The deal timeline of the pair: search the links for the referral, open its Timeline.
    frame.get_by_label("Salesforce", exact=True).check()
    frame.get_by_label("Search links").fill(bad)
    frame.get_by_role("button", name="Search", exact=True).click()
    link_row = frame.locator("#links-table tr", has_text=bad)
    expect(link_row).to_have_count(1)
    expect(link_row).to_contain_text("synced")
    screens.snap(page, "links-search", f"the links searched for {bad}: the pair is synced")
    link_row.get_by_role("link", name="Timeline").click()
    expect(frame.get_by_role("heading", name="Timeline")).to_be_visible()
    timeline = frame.locator("#timeline-table")
    expect(frame.locator("body")).to_contain_text(f"referral {bad}")
    created = timeline.locator("tr", has_text="create")
    expect(created.first).to_contain_text("Partner Center → CRM")
    expect(created.first).to_contain_text(retry_id)
    expect(created.first).to_contain_text('"currency": "USD"')
    screens.snap(page, "timeline", f"the deal timeline of {bad}: created in Salesforce by {retry_id}")

    assert not anonymous_problems, "\n".join(anonymous_problems)
