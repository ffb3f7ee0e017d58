"""The Dynamics 365 (Dataverse Web API) emulator: see :mod:`.app`."""

from .app import Dynamics365Emulator
from .limits import ProtectionLimits, ServiceProtection

__all__ = ["Dynamics365Emulator", "ProtectionLimits", "ServiceProtection"]
