"""The Dynamics 365 (Dataverse) side of the sync: extract opportunities, and load creates,
updates, sync-status marks and links back through :class:`~cosell_sync.hooks.dynamics365.DynamicsHook`.

==================  ===================================================================
:mod:`.side`        :class:`DynamicsSide`: the workflow's steps, updates, marks, links
:mod:`.extract`     OData reads: opportunities with their account, contact and currency
:mod:`.values`      column names, and canonical values as Dataverse takes them
:mod:`.batch`       ``$batch`` writes split on a failed call; chunked reads
:mod:`.lookups`     accounts and contacts matched or created
:mod:`.choices`     the org's choice options, checked at the start of a run
==================  ===================================================================

What goes where is read from the mapping (``engine/mappings/dynamics365.yaml``): a ``crm``
path without a dot is an opportunity column; ``account.<column>`` and ``contact.<column>``
are columns of the opportunity's ``parentaccountid`` and ``parentcontactid`` rows;
``transactioncurrency.isocurrencycode`` is the opportunity's currency (bound through
``transactioncurrencyid``). The field mapped to ``records.closed_field`` (``statecode``) is
the stage: it is never written, won and lost are carried out with the ``WinOpportunity`` /
``LoseOpportunity`` actions, as Dataverse requires.

Writes go through ``$batch`` (at most 1,000 requests per call, ``continue-on-error``), so
every record gets its own outcome: a record Dataverse rejects becomes a failed
:class:`~cosell_sync.sides.base.WriteResult` carrying Dataverse's hex error code and message,
and never stops the others. The create and update sequences are those of
:class:`cosell_sync.sides.crm.CrmSide`: an opportunity that already holds the referral id
(an earlier try made it) is adopted, never written over, and new opportunities are
alternate-key upserts on the referral id (``PATCH opportunities(cosell_referralid='...')``),
so an HTTP retry cannot create a second one.

Updates are conditional: each PATCH carries the ``@odata.etag`` the opportunity was extracted
with as ``If-Match``. A 412 (a seller edited it during the run) re-reads the record, keeps the
planned fields the CRM still holds as planned, defers the others (not written, planned again
next run) and retries once with the new ETag; a second 412 fails the record.
"""

from cosell_sync.sides.dynamics365.choices import check_choices
from cosell_sync.sides.dynamics365.side import DynamicsSide

__all__ = ["DynamicsSide", "check_choices"]
