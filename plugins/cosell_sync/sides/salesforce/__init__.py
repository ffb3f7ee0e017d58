"""The Salesforce side of a sync: extract opportunities (with their account and primary
contact), create opportunities from referrals, update them, and store links.

==================  ===================================================================
:mod:`.side`        :class:`SalesforceSide`: fields and values, the workflow's steps
:mod:`.query`       SOQL reads: the extract, the audit trail and ``SystemModstamp``
:mod:`.writes`      sObject Collections and Bulk API writes, split on a failed call
:mod:`.matching`    accounts and contacts matched or created, the primary contact role
==================  ===================================================================

Reads are SOQL built with :mod:`cosell_sync.hooks.soql` (every value escaped). Writes go
through sObject Collections (200 records a call; Bulk API 2.0 above the hook's
``bulk_threshold`` for updates and upserts), and every record reports its own outcome:

* **Extract.** Every Opportunity-level field the mapping's ``crm`` paths and ``records:``
  names need, the account through the ``Account`` parent relationship, and the primary
  contact through the ``OpportunityContactRoles`` child subquery (``IsPrimary = TRUE``),
  flattened into ``record["Contact"]`` so that ``Contact.Email`` paths resolve.
* **Create** (the steps of :class:`cosell_sync.sides.crm.CrmSide`). An opportunity that
  already holds the referral id (an earlier try of the task made it) is adopted, never
  written over. Accounts are matched by name + postal code (case- and space-insensitive) and
  created when missing; contacts are matched by email (case-insensitive) and created when
  missing; new opportunities are *upserted* by the link field (the referral id), so an HTTP
  retry of the call cannot duplicate one; the contact becomes the opportunity's primary
  ``OpportunityContactRole``.
* **Update.** Only the Opportunity-level fields asked for (accounts and contacts are shared
  between deals, so they are never updated from one referral), plus the sync status and a
  new audit line (newest first, bounded). The query that reads the audit trail right before
  the write also reads ``SystemModstamp``: a record changed since extract is deferred.
* **Failures.** A record Salesforce rejects fails alone, with Salesforce's ``statusCode`` and
  message. A call that fails as a whole is retried in halves until the records that fail it
  are isolated (a create only when nothing can have been written), so the good records of the
  batch are written. Authentication and configuration errors are not about records: they
  raise, so the task fails and retries.
"""

from cosell_sync.sides.salesforce.matching import CREATE_ATTEMPTS
from cosell_sync.sides.salesforce.side import DEFAULT_CLOSE_DAYS, SalesforceSide

__all__ = ["CREATE_ATTEMPTS", "DEFAULT_CLOSE_DAYS", "SalesforceSide"]
