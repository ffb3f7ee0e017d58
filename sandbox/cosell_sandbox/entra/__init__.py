"""The Entra ID token service emulator: see :mod:`.app`."""

from .app import EntraEmulator
from .tokens import EntraConfig

__all__ = ["EntraConfig", "EntraEmulator"]
