"""Airflow DAG: register the Partner Center webhook (``partner_center_webhook_registration``).

Trigger it from the Airflow UI ("Trigger DAG" opens the params form):

* ``webhook_url``: the public https:// URL of the receiver, e.g.
  ``https://airflow.example.com/cosell/webhooks/partner-center``;
* ``events``: the referral events to deliver (default: all four);
* ``overwrite``: replace a registration that differs (Partner Center keeps one per partner);
  without it, a different existing registration fails the run and the log shows it;
* ``send_test_event``: also register ``test-created``, send a validation event and wait
  until Partner Center reports it delivered.

Re-running with the same URL and events writes nothing and succeeds. All the logic is in
the cosell_sync provider (``PartnerCenterWebhookRegistrationOperator``).
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import DAG, Param

from cosell_sync.hooks.partner_center import REFERRAL_EVENTS
from cosell_sync.operators import PartnerCenterWebhookRegistrationOperator

with DAG(
    dag_id="partner_center_webhook_registration",
    description="Register (or replace) the Partner Center webhook that drives cosell_referral_events.",
    schedule=None,
    catchup=False,
    max_active_runs=1,
    render_template_as_native_obj=True,
    tags=["cosell", "partner-center", "webhooks"],
    params={
        "webhook_url": Param(
            type="string",
            format="uri",
            pattern=r"^https://\S+$",
            title="Webhook URL",
            description="Public https:// URL of the receiver, e.g. https://<airflow>/cosell/webhooks/partner-center.",
        ),
        "events": Param(
            list(REFERRAL_EVENTS),
            type="array",
            items={"type": "string", "enum": list(REFERRAL_EVENTS)},
            examples=list(REFERRAL_EVENTS),
            minItems=1,
            uniqueItems=True,
            title="Events",
            description="Referral events Partner Center sends to the URL.",
        ),
        "overwrite": Param(
            False,
            type="boolean",
            title="Overwrite",
            description="Replace an existing registration (PUT). Off: a different registration fails the run.",
        ),
        "send_test_event": Param(
            False,
            type="boolean",
            title="Send a test event",
            description="Also register test-created, send a validation event and wait for its delivery.",
        ),
    },
    doc_md=__doc__,
):
    PartnerCenterWebhookRegistrationOperator(
        task_id="register_webhook",
        webhook_url="{{ params.webhook_url }}",
        events="{{ params.events }}",
        overwrite="{{ params.overwrite }}",
        send_test_event="{{ params.send_test_event }}",
        retries=0,  # the hook already retries transient API errors; a user re-triggers the rest
        execution_timeout=timedelta(minutes=15),
    )
