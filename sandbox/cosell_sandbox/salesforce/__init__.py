"""The Salesforce emulator (REST API, SOQL, Bulk API 2.0 ingest): see :mod:`.app`."""

from .app import SalesforceEmulator
from .records import RecordError

__all__ = ["RecordError", "SalesforceEmulator"]
