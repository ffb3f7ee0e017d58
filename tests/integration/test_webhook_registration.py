"""The partner_center_webhook_registration DAG and its operator, against the sandbox.

Runs go through Airflow (``dag.test(run_conf=...)``); the exact error messages are
checked by calling the operator's ``execute`` directly, the way the task runs it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cosell_sync.hooks.partner_center import REFERRAL_EVENTS
from tests.helpers import Receiver

ROOT = Path(__file__).resolve().parents[2]
DAG_FILE = ROOT / "dags" / "partner_center_webhook_registration.py"
DAG_ID = "partner_center_webhook_registration"
REGISTRATION_PATH = "/webhooks/v1/registration"


@pytest.fixture
def receiver(pc) -> Iterator[Receiver]:
    r = Receiver(pc.pki.server_context())
    yield r
    r.close()


@pytest.fixture(scope="module")
def dag_file_bag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAG_FILE))


@pytest.fixture
def dag(airflow_db, pc_conn):
    """The DAG as Airflow parses it, after the metadata DB exists."""
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAG_FILE)).dags[DAG_ID]


def registration_writes(pc) -> list[tuple[str, int]]:
    """(method, status) of every write to the registration resource, in order."""
    return [(e.method, e.status) for e in pc.partner_center.log if e.path == REGISTRATION_PATH and e.method != "GET"]


def stored(pc) -> dict[str, Any] | None:
    reg = pc.partner_center.registration
    return None if reg is None else {"url": reg["WebhookUrl"], "events": set(reg["WebhookEvents"])}


def operator(**kwargs: Any):
    from cosell_sync.operators import PartnerCenterWebhookRegistrationOperator

    kwargs.setdefault("validation_poll_interval", 0.1)
    kwargs.setdefault("validation_timeout", 15)
    return PartnerCenterWebhookRegistrationOperator(task_id="register_webhook", **kwargs)


def task_state(run, task_id: str = "register_webhook") -> str:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        ti = session.query(TaskInstance).filter_by(dag_id=DAG_ID, run_id=run.run_id, task_id=task_id).one()
        return str(ti.state)


# -- the DAG file ------------------------------------------------------------------------------
def test_dag_imports_with_zero_errors_and_has_the_params_form(dag_file_bag):
    assert dag_file_bag.import_errors == {}
    dag = dag_file_bag.dags[DAG_ID]
    assert type(dag.timetable).__name__ == "NullTimetable"  # schedule=None: triggered from the UI
    assert dag.render_template_as_native_obj
    assert set(dag.params.keys()) == {"webhook_url", "events", "overwrite", "send_test_event"}

    url = dag.params.get_param("webhook_url")
    assert not url.has_value  # required: no default
    assert url.schema["type"] == "string" and url.schema["format"] == "uri"
    events = dag.params.get_param("events")
    assert events.value == list(REFERRAL_EVENTS)
    assert events.schema["type"] == "array" and events.schema["items"]["enum"] == list(REFERRAL_EVENTS)
    assert dag.params.get_param("overwrite").value is False
    assert dag.params.get_param("send_test_event").value is False
    assert {dag.params.get_param(k).schema["type"] for k in ("overwrite", "send_test_event")} == {"boolean"}

    (task,) = dag.tasks
    assert type(task).__name__ == "PartnerCenterWebhookRegistrationOperator"
    assert set(task.template_fields) == {"webhook_url", "events", "overwrite", "send_test_event"}
    assert task.webhook_url == "{{ params.webhook_url }}"


def test_dag_file_uses_only_task_sdk_imports():
    import ast

    tree = ast.parse(DAG_FILE.read_text())
    modules = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    assert all(m == "airflow.sdk" for m in modules if m.startswith("airflow"))
    assert "Airflow" in (ast.get_docstring(tree) or "")


# -- through Airflow -------------------------------------------------------------------------------
def test_fresh_registration_is_posted_and_verified(pc, dag, receiver):
    run = dag.test(run_conf={"webhook_url": receiver.url})
    assert str(run.state) == "success"
    assert stored(pc) == {"url": receiver.url, "events": set(REFERRAL_EVENTS)}
    assert registration_writes(pc) == [("POST", 200)]
    # read before and read back after the write
    gets = [e for e in pc.partner_center.log if e.path == REGISTRATION_PATH and e.method == "GET"]
    assert [e.status for e in gets] == [404, 200]


def test_second_run_without_overwrite_fails_and_with_overwrite_puts(pc, dag, receiver, capfd):
    assert str(dag.test(run_conf={"webhook_url": receiver.url}).state) == "success"
    first = stored(pc)

    # Same URL and events again: nothing to write, so it succeeds without a write.
    pc.partner_center.log.clear()
    assert str(dag.test(run_conf={"webhook_url": receiver.url}).state) == "success"
    assert registration_writes(pc) == []

    # A different registration without overwrite: the run fails and nothing changes.
    new_url = receiver.url + "?v=2"
    conf = {"webhook_url": new_url, "events": ["referral-updated", "related-referral-updated"]}
    pc.partner_center.log.clear()
    capfd.readouterr()
    failed = dag.test(run_conf=conf)
    assert str(failed.state) == "failed"
    assert task_state(failed) == "failed"
    task_log = capfd.readouterr().out
    assert f"A different Partner Center webhook is already registered: URL {receiver.url}, events [" in task_log
    assert "run again with overwrite=true" in task_log
    assert registration_writes(pc) == []
    assert stored(pc) == first

    # With overwrite: PUT, and the registration has the new URL and events.
    pc.partner_center.log.clear()
    updated = dag.test(run_conf={**conf, "overwrite": True})
    assert str(updated.state) == "success"
    assert registration_writes(pc) == [("PUT", 200)]
    assert stored(pc) == {"url": new_url, "events": {"referral-updated", "related-referral-updated"}}


def test_send_test_event_registers_test_created_and_the_validation_event_completes(pc, dag, receiver):
    run = dag.test(run_conf={"webhook_url": receiver.url, "events": ["referral-created"], "send_test_event": True})
    assert str(run.state) == "success"
    assert stored(pc) == {"url": receiver.url, "events": {"referral-created", "test-created"}}
    (validation,) = pc.partner_center.validation_events.values()
    assert validation["status"] == "completed"
    assert validation["results"][0]["responseCode"] == "OK"
    receiver.wait_for(1)
    _, body = receiver.received[0]
    assert b'"EventName": "test-created"' in body


@pytest.mark.parametrize(
    ("conf", "expected"),
    [
        ({}, r"param webhook_url: No value passed"),
        ({"webhook_url": "http://example.com/hook"}, r"param webhook_url: 'http://example\.com/hook' does not match"),
        ({"webhook_url": "https://example.com/hook", "events": ["referral-deleted"]}, r"param events: 'referral-del"),
        ({"webhook_url": "https://example.com/hook", "events": []}, r"param events: \[\] should be non-empty"),
    ],
)
def test_invalid_params_are_rejected_before_any_api_call(pc, dag, conf, expected):
    from airflow.sdk.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError, match=expected):
        dag.test(run_conf=conf)
    assert not [e for e in pc.partner_center.log if e.path.startswith("/webhooks/")]
    assert pc.partner_center.registration is None


def test_a_key_in_the_url_query_stays_out_of_task_logs_and_rendered_fields(pc, dag, receiver, capfd):
    from airflow.models.renderedtifields import RenderedTaskInstanceFields
    from airflow.utils.session import create_session

    secret = "s3cr3t-function-key"
    capfd.readouterr()
    run = dag.test(run_conf={"webhook_url": f"{receiver.url}?code={secret}"})
    assert str(run.state) == "success"
    assert secret not in capfd.readouterr().out
    with create_session() as session:
        rendered = session.query(RenderedTaskInstanceFields).filter_by(dag_id=DAG_ID, run_id=run.run_id).one()
        assert secret not in str(rendered.rendered_fields)
    assert stored(pc)["url"] == f"{receiver.url}?code={secret}"  # registered as given


# -- the operator's messages ------------------------------------------------------------------------
def test_the_failure_names_the_current_registration_and_how_to_overwrite(pc, pc_conn, receiver, hook):
    from cosell_sync.operators.webhook_registration import WebhookRegistrationError

    hook.create_webhook_registration(receiver.url, ["referral-created", "referral-updated"])
    with pytest.raises(WebhookRegistrationError) as err:
        operator(webhook_url="https://partner.example.com/cosell/webhooks/partner-center").execute({})
    message = str(err.value)
    assert receiver.url in message
    assert "referral-created, referral-updated" in message
    assert "overwrite=true" in message
    assert "https://partner.example.com/cosell/webhooks/partner-center" in message  # what was asked for
    assert registration_writes(pc) == [("POST", 200)]  # only the setup's


def test_operator_returns_a_summary_and_hides_query_secrets(pc, pc_conn, receiver):
    secret = "s3cr3t-function-key"
    op = operator(webhook_url=f"{receiver.url}?code={secret}", events=("referral-created",))
    assert op.execute({}) == {
        "webhook_url": f"{receiver.url}?code=***",
        "events": ["referral-created"],
        "action": "created",
        "validation": None,
    }
    assert op.execute({})["action"] == "unchanged"
    again = operator(webhook_url=f"{receiver.url}?code={secret}", events=["referral-updated"], overwrite="true")
    assert again.execute({})["action"] == "updated"  # string bools (non-native rendering) are understood

    from cosell_sync.operators.webhook_registration import WebhookRegistrationError

    with pytest.raises(WebhookRegistrationError) as err:
        operator(webhook_url="https://other.example.com/hook").execute({})
    assert secret not in str(err.value) and "code=***" in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"webhook_url": "http://example.com/hook"}, r"must be an absolute https:// URL.*http://example\.com/hook"),
        ({"webhook_url": "example.com/hook"}, r"must be an absolute https:// URL"),
        ({"webhook_url": ""}, r"'webhook_url' is required"),
        ({"webhook_url": "https://user:pw@example.com/hook"}, r"must not carry credentials"),
        ({"webhook_url": "https://example.com:99999/hook"}, r"is not a valid URL: Port out of range"),
        ({"events": ["referral-created", "referral-deleted"]}, r"Unknown webhook event\(s\): 'referral-deleted'"),
        ({"events": []}, r"'events' is empty"),
        ({"overwrite": "maybe"}, r"'overwrite' must be true or false"),
    ],
)
def test_bad_parameters_fail_clearly_without_writing(pc, pc_conn, kwargs, expected):
    from cosell_sync.operators.webhook_registration import WebhookRegistrationError

    kwargs = {"webhook_url": "https://example.com/hook", **kwargs}
    with pytest.raises(WebhookRegistrationError, match=expected) as err:
        operator(**kwargs).execute({})
    assert "pw@" not in str(err.value)
    assert registration_writes(pc) == []
    assert pc.partner_center.registration is None


def test_an_undelivered_validation_event_fails_clearly(pc, pc_conn):
    from cosell_sync.operators.webhook_registration import WebhookVerificationError

    failing = Receiver(pc.pki.server_context(), fail_first=10**6)
    try:
        op = operator(webhook_url=failing.url, events=["referral-created"], send_test_event=True)
        with pytest.raises(WebhookVerificationError, match=r"was not delivered to .*responseCode 500"):
            op.execute({})
    finally:
        failing.close()
    # the registration itself was made and verified
    assert stored(pc) == {"url": failing.url, "events": {"referral-created", "test-created"}}
