"""The Dynamics 365 (Dataverse Web API) emulator: see :mod:`.app`."""

from .app import DataverseEmulator
from .limits import ProtectionLimits, ServiceProtection

__all__ = ["DataverseEmulator", "ProtectionLimits", "ServiceProtection"]
