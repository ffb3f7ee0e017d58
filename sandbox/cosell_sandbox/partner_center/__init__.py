"""The Partner Center emulator (referrals, webhook registration, signed deliveries): see :mod:`.app`."""

from .app import PartnerCenterEmulator
from .webhooks import WebhookDispatcher

__all__ = ["PartnerCenterEmulator", "WebhookDispatcher"]
