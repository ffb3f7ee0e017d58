"""The Dataverse emulator's control plane: reset, limits, behaviour switches, state, rows as a
CRM user sees them, time, and the ``/_sandbox/tables`` endpoints."""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime, timedelta
from typing import Any

from ..server import Request, Response
from .choices import DEFAULT_CHOICE_BASE
from .customizations import Customizations
from .limits import ProtectionLimits
from .records import DataverseConfig, _json, _not_found, _stamp
from .schema import TABLES


class ControlMixin:
    """Control methods and handlers of :class:`Dynamics365Emulator`."""

    def reset(self) -> None:
        """Empty tables (currencies re-seeded), default limits and config; older delta tokens expire."""
        with self.lock:
            for name in TABLES:
                self.tables[name].clear()
                self._alt[name].clear()
                self._row_seq[name].clear()
                self._deleted[name].clear()
            self._floor = self._seq + 1
            self.config = DataverseConfig()
            self.custom = Customizations()
            self._seed_currencies()
        self.protection.reset()
        super().reset()

    def configure_limits(self, **changes: Any) -> dict[str, Any]:
        """Service protection limits (``requests``, ``window_seconds``, ``execution_ms``, ``concurrent``,
        ``request_cost_ms``, ``dop_hint``) and ``delta_token_lifetime_seconds``; usage counters restart."""
        lifetime = changes.pop("delta_token_lifetime_seconds", None)
        limits = asdict(self.protection.limits)
        unknown = set(changes) - set(limits)
        if unknown:
            raise ValueError(f"unknown limit(s): {sorted(unknown)}")
        limits.update(changes)
        self.protection.reset(ProtectionLimits(**limits))
        if lifetime is not None:
            self.config.delta_token_lifetime_seconds = float(lifetime)
        return self.limits_state()

    def limits_state(self) -> dict[str, Any]:
        return {
            **asdict(self.protection.limits),
            "delta_token_lifetime_seconds": self.config.delta_token_lifetime_seconds,
        }

    def configure(self, **changes: Any) -> dict[str, Any]:
        """Behaviour switches: ``enforce_required`` (bool), ``closed_opportunity_writes`` ("allow"|"reject"),
        ``choice_value_base`` (int: the first option value of the publisher's ``cosell_*`` choice columns)."""
        current = asdict(self.config)
        unknown = set(changes) - set(current)
        if unknown:
            raise ValueError(f"unknown setting(s): {sorted(unknown)}")
        if changes.get("closed_opportunity_writes", "allow") not in ("allow", "reject"):
            raise ValueError("closed_opportunity_writes must be 'allow' or 'reject'")
        base = changes.get("choice_value_base", DEFAULT_CHOICE_BASE)
        if isinstance(base, bool) or not isinstance(base, int) or not 10_000 <= base <= 2_147_000_000:
            raise ValueError("choice_value_base must be an integer option value (e.g. 858880000)")
        current.update(changes)
        self.config = DataverseConfig(**current)
        if "cosell_columns" in changes:
            with self.lock:
                self.custom = Customizations()
                if not self.config.cosell_columns:
                    self.custom.strip()
        return asdict(self.config)

    def config_state(self) -> dict[str, Any]:
        return asdict(self.config)

    def state(self) -> dict[str, Any]:
        with self.lock:
            return {
                "counts": {name: len(rows) for name, rows in self.tables.items()},
                "change_sequence": self._seq,
                "limits": self.limits_state(),
                "config": asdict(self.config),
                "organizationId": self.organization_id,
            }

    def rows(self, entity_set: str) -> list[dict[str, Any]]:
        table = self._table(entity_set)
        with self.lock:
            return [dict(row) for row in self.tables[table.set].values()]

    def row(self, entity_set: str, row_id: str) -> dict[str, Any]:
        table = self._table(entity_set)
        with self.lock:
            row = self.tables[table.set].get(row_id.lower())
            if row is None:
                raise _not_found(table, row_id)
            return dict(row)

    def create(self, entity_set: str, values: dict[str, Any]) -> dict[str, Any]:
        """Create a row as a CRM user would (``@odata.bind`` accepted; statecode writable)."""
        table = self._table(entity_set)
        with self.lock:
            return dict(self._insert(table, self._changes(table, values), trusted=True))

    def edit(self, entity_set: str, row_id: str, changes: dict[str, Any]) -> dict[str, Any]:
        """A CRM-user edit: sets columns directly, bumps the version, shows up in change tracking."""
        table = self._table(entity_set)
        with self.lock:
            old = self.tables[table.set].get(row_id.lower())
            if old is None:
                raise _not_found(table, row_id)
            return dict(self._modify(table, old, self._changes(table, changes), trusted=True))

    def delete(self, entity_set: str, row_id: str) -> None:
        """A CRM-user delete; change tracking reports it."""
        table = self._table(entity_set)
        with self.lock:
            if row_id.lower() not in self.tables[table.set]:
                raise _not_found(table, row_id)
            self._discard(table, row_id.lower())

    def age(self, seconds: float) -> int:
        """Time passes: every row's ``createdon`` and ``modifiedon`` move ``seconds`` into the past,
        as if everything had happened that much earlier (row versions and change tracking are
        untouched; so is the server's own clock, the ``Date`` of its answers). Returns the rows
        aged."""
        delta = timedelta(seconds=seconds)
        aged = 0
        with self.lock:
            for name in TABLES:
                for row in self.tables[name].values():
                    for column in ("createdon", "modifiedon"):
                        value = row.get(column)
                        if isinstance(value, str) and value:
                            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
                            row[column] = _stamp(moment - delta)
                    aged += 1
        return aged

    # -- control plane ----------------------------------------------------------------------------
    def _ctl_rows(self, request: Request) -> Response:
        return _json({"value": self.rows(request.params["set"])})

    def _ctl_row(self, request: Request) -> Response:
        return _json(self.row(request.params["set"], request.params["id"]))

    def _ctl_edit(self, request: Request) -> Response:
        return _json(self.edit(request.params["set"], request.params["id"], self.control_body(request)))

    def _ctl_delete(self, request: Request) -> Response:
        self.delete(request.params["set"], request.params["id"])
        return Response.empty()
