"""Each system's side of a sync: extract (raw records through its hook) and load (batched
writes, one :class:`~cosell_sync.sides.base.WriteResult` per record), on one shared workflow.

======================  ==============================================================
:mod:`.crm`             :class:`~cosell_sync.sides.crm.CrmSide`: the CRM contract and
                        the create/update steps every CRM runs
:mod:`.salesforce`      Salesforce (Opportunity, Account, Contact)
:mod:`.dynamics365`     Dynamics 365 (Dataverse Web API)
:mod:`.partner_center`  Partner Center referrals
:mod:`.base`            what every side shares: write results, the run context, audit lines
:mod:`.solutions`       the solutions a referral carries, with their details
======================  ==============================================================

The pipeline (:mod:`cosell_sync.pipeline`) calls the sides; they never call it.
"""
