"""Choice columns of the Dataverse emulator: the one place the options of every choice column are
defined (values, labels, which status fits which state), for writes, reads and table definitions."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_CHOICE_BASE = 858_880_000  # a publisher option value prefix (85888) x 10,000, as a real org has


# ---------------------------------------------------------------------------
# Choices: the one place the options of every choice column are defined


@dataclass(frozen=True)
class Option:
    value: int | None  # None: a custom column's option, valued base + its position
    label: str
    state: int | None = None  # statuscode options: the statecode they belong to
    default_status: int | None = None  # statecode options: their default statuscode


@dataclass(frozen=True)
class Choice:
    kind: str  # "Picklist", "State" or "Status"
    options: tuple[Option, ...]
    global_name: str | None = None  # a global choice (GlobalOptionSetDefinitions), else a local one


def _fixed(*labels: tuple[int, str]) -> tuple[Option, ...]:
    return tuple(Option(value, label) for value, label in labels)


def _custom(*labels: str) -> tuple[Option, ...]:
    return tuple(Option(None, label) for label in labels)


HELP_LABELS = (  # in the order of seed.HELP_CODES
    "General or other",
    "Customer technical architecture",
    "Proof of concept or demo",
    "Quotes or licensing",
    "Post-sales customer success",
    "Workload-specific value proposition",
)
_ACTIVE_STATES = Choice("State", (Option(0, "Active", default_status=1), Option(1, "Inactive", default_status=2)))
_ACTIVE_STATUSES = Choice("Status", (Option(1, "Active", state=0), Option(2, "Inactive", state=1)))
CHOICES: dict[tuple[str, str], Choice] = {
    ("opportunity", "statecode"): Choice(
        "State",
        (Option(0, "Open", default_status=1), Option(1, "Won", default_status=3), Option(2, "Lost", default_status=4)),
    ),
    ("opportunity", "statuscode"): Choice(
        "Status",
        (
            Option(1, "In Progress", state=0),
            Option(2, "On Hold", state=0),
            Option(3, "Won", state=1),
            Option(4, "Canceled", state=2),
            Option(5, "Out-Sold", state=2),
        ),
    ),
    ("opportunity", "salesstage"): Choice(
        "Picklist", _fixed((0, "Qualify"), (1, "Develop"), (2, "Propose"), (3, "Close"))
    ),
    ("opportunity", "cosell_howcanmicrosofthelp"): Choice(
        "Picklist", _custom(*HELP_LABELS), global_name="cosell_howcanmicrosofthelp"
    ),
    ("opportunity", "cosell_syncstatus"): Choice("Picklist", _custom("Synced", "Pending", "Error")),
    ("account", "statecode"): _ACTIVE_STATES,
    ("account", "statuscode"): _ACTIVE_STATUSES,
    ("contact", "statecode"): _ACTIVE_STATES,
    ("contact", "statuscode"): _ACTIVE_STATUSES,
}


def option_values(choice: Choice, base: int) -> list[tuple[int, Option]]:
    """(value, option) pairs of a choice column, custom ones valued ``base + i``."""
    return [(o.value if o.value is not None else base + i, o) for i, o in enumerate(choice.options)]


def states(logical: str) -> dict[int, tuple[str, tuple[int, ...]]]:
    """statecode -> (its name, the statuscode values that fit it; the default first)."""
    state_choice, status_choice = CHOICES[(logical, "statecode")], CHOICES[(logical, "statuscode")]
    out: dict[int, tuple[str, tuple[int, ...]]] = {}
    for state in state_choice.options:
        fitting = [s.value for s in status_choice.options if s.state == state.value and s.value is not None]
        fitting.sort(key=lambda v: v != state.default_status)
        out[int(state.value or 0)] = (state.label, tuple(fitting))
    return out
