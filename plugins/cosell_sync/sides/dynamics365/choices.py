"""The org's choice columns: the labels a mapping names resolved to this org's values, and the
sync status column's options, read from the opportunity table's metadata.
"""

from __future__ import annotations

from collections.abc import Mapping

from cosell_sync.engine.mapping import MappingError, SyncMapping, choice_columns, resolve_choices
from cosell_sync.errors import ConfigurationError
from cosell_sync.hooks.dynamics365 import DynamicsHook

# cosell_syncstatus choice values (Synced, Pending, Error)
SYNC_STATUSES = ("Synced", "Pending", "Error")  # the sync status column's option labels


def choice_options(hook: DynamicsHook, mapping: SyncMapping) -> dict[str, dict[str, int]]:
    """The org's options (label -> value), from the opportunity table's metadata, of the choice
    columns the mapping names by label and of the sync status column (its statuses are labels)."""
    columns = {*choice_columns(mapping, labelled_only=True), mapping.records["sync_status_field"]}
    return hook.choice_options(mapping.records["opportunity"], sorted(columns))


def resolve_mapping(mapping: SyncMapping, options: Mapping[str, Mapping[str, int]]) -> SyncMapping:
    """``mapping`` in this org's choice values; a label (or a pinned value) the org does not have is
    a :class:`ConfigurationError` naming the file, the field and the value, listing the labels."""
    try:
        return resolve_choices(mapping, options, where="this Dataverse org")
    except MappingError as exc:
        raise ConfigurationError(str(exc)) from None


def sync_statuses(mapping: SyncMapping, options: Mapping[str, Mapping[str, int]]) -> dict[str, int]:
    """The sync status column's value for each status (Synced, Pending, Error), by its label."""
    column = mapping.records["sync_status_field"]
    labels = {label.casefold(): value for label, value in (options.get(column) or {}).items()}
    missing = [status for status in SYNC_STATUSES if status.casefold() not in labels]
    if missing:
        raise ConfigurationError(
            f"mapping {mapping.source}: records.sync_status_field: the choice column {column} of this Dataverse org "
            f"has no option labelled {', '.join(repr(m) for m in missing)}; its options: "
            f"{', '.join(repr(label) for label in options.get(column) or {}) or 'none'}"
        )
    return {status: int(labels[status.casefold()]) for status in SYNC_STATUSES}


def check_choices(hook: DynamicsHook, mapping: SyncMapping) -> dict[str, dict[str, int]]:
    """At the start of a run: every choice value of a column the mapping names by label (pinned
    integers beside them too) is one the org has, and so are the sync statuses. Returns those
    columns' options, for the run's other tasks to build their side with, without reading the
    metadata again (``DynamicsSide(hook, mapping, choices=...)``)."""
    options = choice_options(hook, mapping)
    resolve_mapping(mapping, options)
    sync_statuses(mapping, options)
    return options
