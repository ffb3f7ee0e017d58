"""The planner: a pure function from both sides' rows and the last synced values to the
operations a run performs. Whole frames in, whole frames out: it loops over the mapped
fields (a handful), never over records.

Three-way merge per field, against the *base* (the canonical value last synced):

* changed on one side only -> copied to the other side;
* changed on both sides to the same value -> agreed, nothing to write;
* changed on both sides differently -> a conflict, resolved by the field's authority
  (``partner_center``, ``crm``, or ``newest`` by modification time) and reported;
* unchanged, or changed back to what we wrote -> nothing (an echo of our own write).

Rules on top (SPEC §5): only flagged, open opportunities create referrals; only New or
Active referrals create opportunities; a Closed referral is terminal (nothing is written
to it); Partner Center status transitions are checked before a write is planned; a
record already linked elsewhere never creates a duplicate.

The steps, one module each, in the order :func:`~cosell_sync.engine.plan.planner.plan` runs them:

1. :mod:`.pairing`: the pairs (known links, and links recovered from the records);
2. :mod:`.versions`: per field, its three versions aligned to the pairs;
3. :mod:`.decide`: per field, the merge and the rules, as masks;
4. :mod:`.changes`: per field, the changes, conflicts and blocked writes as frames;
5. :mod:`.new_base`: the values both sides hold afterwards, and the pairs left alone;
6. :mod:`.creates`: unlinked records, created on the other side or skipped.

:mod:`.columns` holds the column helpers (Arrow in, Python values out only where written),
:mod:`.base` the links' bases, :mod:`.result` the :class:`Plan` and the rules' constants.
"""

from cosell_sync.engine.plan.base import BASE_PREFIX, columnar_links, with_base_dicts
from cosell_sync.engine.plan.planner import plan
from cosell_sync.engine.plan.result import (
    CHANGE_COLUMNS,
    CONFLICT_COLUMNS,
    CRM,
    DIRECTIONS,
    ECHO_TOLERANCE,
    OPEN_REFERRAL,
    PC,
    SKIP_COLUMNS,
    STAGE_TRANSITIONS,
    Plan,
)

__all__ = [
    "BASE_PREFIX",
    "CHANGE_COLUMNS",
    "CONFLICT_COLUMNS",
    "CRM",
    "DIRECTIONS",
    "ECHO_TOLERANCE",
    "OPEN_REFERRAL",
    "PC",
    "SKIP_COLUMNS",
    "STAGE_TRANSITIONS",
    "Plan",
    "columnar_links",
    "plan",
    "with_base_dicts",
]
