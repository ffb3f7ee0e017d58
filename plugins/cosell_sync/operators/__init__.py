"""Airflow operators of the cosell-sync provider."""

from __future__ import annotations

from cosell_sync.operators.webhook_registration import PartnerCenterWebhookRegistrationOperator

__all__ = ["PartnerCenterWebhookRegistrationOperator"]
