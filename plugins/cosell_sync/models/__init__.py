"""Typed models of the external resources (no Airflow imports)."""

from cosell_sync.models.referral import *  # noqa: F403
from cosell_sync.models.referral import __all__ as __all__
