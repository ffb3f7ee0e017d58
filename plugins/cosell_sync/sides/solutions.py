"""The solutions a referral carries, with the details Partner Center holds for them.

A CRM holds a referral's solutions as ids only (``PC_Solutions__c`` / ``cosell_solutions``:
``"SOL-1;SOL-2"``); Partner Center holds an object per solution,
``details.requirements.solutions[{id, name, type, publisherName, solutionType, price, quantity,
currency}]`` (Microsoft Learn, "Referral resources",
https://learn.microsoft.com/partner-center/developer/referral-resources: the ``Solution``
resource; ``type`` is ``None|Category|Name``). When the CRM changes which solutions are attached,
:func:`merge_solutions` builds the new list: a solution that stays is sent back exactly as
Partner Center holds it, a new one gets the details configured in the :class:`SolutionCatalog`,
or goes by id alone when none are configured (as the API allows). Partner Center has no public
lookup of solution details by id (API-NOTES, "Related values"), hence the configuration.

The catalog comes from (in order) the file named by the ``COSELL_SOLUTIONS_FILE`` environment
variable (JSON or YAML), or the Airflow Variable ``cosell_solutions`` (JSON). Either holds a list
of objects, or an object keyed by solution id::

    [{"id": "SOL-6115380-IPC", "name": "Contoso Cloud Migration Factory",
      "publisherName": "Contoso Ltd", "type": "Name"}]

Neither configured: an empty catalog (new solutions go by id alone). The Airflow Variable is
read lazily (never at import), through the Task SDK, and an Airflow without one is an empty
catalog. A bad file or Variable is a :class:`ConfigurationError` naming it and the entry.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cosell_sync.errors import ConfigurationError

ENV_VAR = "COSELL_SOLUTIONS_FILE"
VARIABLE = "cosell_solutions"
# Where a referral holds its solutions (the mapping's ``details.requirements.solutions[].id``).
SOLUTIONS_PATH = ("details", "requirements", "solutions")
# The Solution resource's members (Microsoft Learn, "Referral resources").
SOLUTION_TYPES = ("None", "Category", "Name")
_TEXT = ("id", "name", "publisherName", "solutionType")
_NUMBERS = ("price", "quantity")
FIELDS = ("id", "name", "type", "publisherName", "solutionType", "price", "quantity", "currency")
_CURRENCY = re.compile(r"[A-Z]{3}")
VARIABLE_TTL = 60.0  # seconds a catalog read from the Airflow Variable is reused in one process


@dataclass(frozen=True)
class SolutionCatalog:
    """Configured details of solutions, by id (each value a complete Solution object)."""

    solutions: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    source: str = "none"

    def __len__(self) -> int:
        return len(self.solutions)

    def __contains__(self, solution_id: object) -> bool:
        return solution_id in self.solutions

    def get(self, solution_id: str) -> dict[str, Any] | None:
        """A copy of the configured object for ``solution_id`` (None when not configured)."""
        found = self.solutions.get(solution_id)
        return dict(found) if found is not None else None

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def parse(cls, data: Any, source: str) -> SolutionCatalog:
        """A catalog from decoded JSON/YAML: a list of objects, or an object keyed by id.
        ``source`` names the file or Variable in errors."""
        if data is None:
            return cls({}, source)
        if isinstance(data, Mapping):
            entries: list[tuple[str, Any, str | None]] = [(f"entry {k!r}", v, str(k)) for k, v in data.items()]
        elif isinstance(data, list):
            entries = [(f"entry {i}", v, None) for i, v in enumerate(data)]
        else:
            raise ConfigurationError(
                f"solutions configuration {source}: expected a list of solutions or an object keyed by "
                f"solution id, got {type(data).__name__}"
            )
        solutions: dict[str, dict[str, Any]] = {}
        for where, raw, key in entries:
            solution = _solution(raw, key, f"solutions configuration {source}, {where}")
            if solution["id"] in solutions:
                raise ConfigurationError(
                    f"solutions configuration {source}, {where}: solution id {solution['id']!r} appears twice"
                )
            solutions[solution["id"]] = solution
        return cls(solutions, source)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> SolutionCatalog:
        """JSON (``.json``) or YAML (any other name; YAML also reads JSON)."""
        file = Path(path)
        source = f"file {str(file)!r}"
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigurationError(f"solutions configuration {source} cannot be read: {exc.strerror or exc}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigurationError(f"solutions configuration {source} is not UTF-8 text: {exc}") from exc
        try:
            data = json.loads(text) if file.suffix.lower() == ".json" else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as exc:
            raise ConfigurationError(f"solutions configuration {source} does not parse: {exc}") from exc
        return cls.parse(data, source)

    @classmethod
    def from_variable(cls, key: str = VARIABLE) -> SolutionCatalog:
        """The Airflow Variable ``key`` (JSON). Empty when it is not set, or outside Airflow."""
        raw = _variable(key)
        source = f"Airflow Variable {key!r}"
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            return cls({}, source)
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except ValueError as exc:
                raise ConfigurationError(f"solutions configuration {source} is not JSON: {exc}") from exc
        return cls.parse(raw, source)

    @classmethod
    def load(cls) -> SolutionCatalog:
        """The configured catalog: ``$COSELL_SOLUTIONS_FILE``, else the Airflow Variable, else empty."""
        path = os.environ.get(ENV_VAR, "").strip()
        if path:
            return cls.from_file(path)
        return cls.from_variable()


def _variable(key: str) -> Any:
    """The Airflow Variable's raw value, or None (not set, or no Airflow Task SDK here)."""
    try:
        # Airflow 3 Task SDK ("Variables", https://airflow.apache.org/docs/apache-airflow/stable/howto/variable.html):
        # Variable.get(key, default=...) returns the default when the key is not set.
        from airflow.sdk import Variable
    except ImportError:
        return None
    return Variable.get(key, default=None)


def _solution(raw: Any, key: str | None, where: str) -> dict[str, Any]:
    """One configured Solution object, checked; ``key``: its id when the file is keyed by id."""
    if isinstance(raw, str) and key is not None:
        raw = {"name": raw}  # {"SOL-1": "Its name"}: a short form
    if not isinstance(raw, Mapping):
        raise ConfigurationError(f"{where}: a solution must be an object, got {type(raw).__name__}")
    unknown = sorted(str(k) for k in raw if k not in FIELDS)
    if unknown:
        raise ConfigurationError(f"{where}: unknown member(s) {unknown}; a solution has {list(FIELDS)}")
    solution: dict[str, Any] = {k: raw[k] for k in FIELDS if raw.get(k) is not None}
    if key is not None:
        if "id" in solution and str(solution["id"]).strip() != key.strip():
            raise ConfigurationError(f"{where}: its id {solution['id']!r} differs from its key {key!r}")
        solution["id"] = key
    for name in _TEXT:
        if name in solution and not (isinstance(solution[name], str) and solution[name].strip()):
            raise ConfigurationError(f"{where}: {name!r} must be non-empty text, got {solution[name]!r}")
    if "id" not in solution:
        raise ConfigurationError(f"{where}: a solution needs an 'id'")
    solution["id"] = solution["id"].strip()
    if ";" in solution["id"]:
        raise ConfigurationError(f"{where}: the id {solution['id']!r} holds ';' (the CRM's list separator)")
    solution.setdefault("type", "Name")
    if solution["type"] not in SOLUTION_TYPES:
        raise ConfigurationError(f"{where}: 'type' {solution['type']!r} is not one of {list(SOLUTION_TYPES)}")
    for name in _NUMBERS:
        value = solution.get(name)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0
        ):
            raise ConfigurationError(f"{where}: {name!r} must be a non-negative number, got {value!r}")
    currency = solution.get("currency")
    if currency is not None and not (isinstance(currency, str) and _CURRENCY.fullmatch(currency)):
        raise ConfigurationError(f"{where}: 'currency' must be an ISO 4217 code such as 'USD', got {currency!r}")
    return solution


# -- the catalog a process uses ------------------------------------------------------------------
_lock = threading.Lock()
_cached: tuple[Any, SolutionCatalog] | None = None


def _fingerprint() -> Any:
    """What the configured catalog depends on now: the file (its name, size and mtime), else a
    time bucket for the Airflow Variable (re-read at most every :data:`VARIABLE_TTL` seconds)."""
    path = os.environ.get(ENV_VAR, "").strip()
    if path:
        try:
            stat = os.stat(path)
        except OSError:
            return ("file", path, None)
        return ("file", path, stat.st_mtime_ns, stat.st_size)
    return ("variable", int(time.monotonic() // VARIABLE_TTL))


def configured_catalog() -> SolutionCatalog:
    """:meth:`SolutionCatalog.load`, read once and reused while its source is unchanged
    (thread-safe: the Partner Center side writes from a thread pool)."""
    global _cached
    key = _fingerprint()
    with _lock:
        if _cached is None or _cached[0] != key:
            _cached = (key, SolutionCatalog.load())
        return _cached[1]


# -- building the list ---------------------------------------------------------------------------
def _ids(ids: Iterable[Any]) -> list[str]:
    return list(dict.fromkeys(s for s in (str(i).strip() for i in ids if i is not None) if s))


def merge_solutions(
    current: Sequence[Mapping[str, Any]] | None, ids: Sequence[str], catalog: SolutionCatalog
) -> list[dict[str, Any]]:
    """The referral's new solution list for the CRM's ``ids``.

    Solutions the referral holds and ``ids`` keeps come first, in the referral's order, each
    exactly as the referral holds it (every detail kept); new ones follow, sorted by id, each
    with the catalog's details, or ``{"id": id}`` alone when the catalog has none."""
    wanted = _ids(ids)
    held: dict[str, dict[str, Any]] = {}
    for item in current or []:
        if isinstance(item, Mapping) and item.get("id") is not None:
            held.setdefault(str(item["id"]).strip(), dict(item))
    keep = set(wanted)
    staying = [sid for sid in held if sid in keep]
    new = sorted(sid for sid in wanted if sid not in held)
    return [held[sid] for sid in staying] + [catalog.get(sid) or {"id": sid} for sid in new]


def new_referral_solutions(ids: Sequence[str], catalog: SolutionCatalog | None = None) -> list[dict[str, Any]]:
    """The solution objects of a new referral (a create): the catalog's details, or id alone."""
    return merge_solutions(None, ids, configured_catalog() if catalog is None else catalog)


def _held(current: Mapping[str, Any] | None) -> list[Any] | None:
    cur: Any = current
    for key in SOLUTIONS_PATH:
        if not isinstance(cur, Mapping):
            return None
        cur = cur.get(key)
    return cur if isinstance(cur, list) else None


def with_solution_details(
    path: Sequence[str],
    value: Any,
    current: Mapping[str, Any] | None = None,
    catalog: SolutionCatalog | None = None,
) -> Any:
    """``value`` to write at ``path`` of a referral that holds ``current`` (None: a new referral).

    The one call the Partner Center side makes for each (path, value) pair
    :func:`~cosell_sync.sides.partner_center.referral_assignments` yields: the solution list
    (``[{"id": ...}, ...]`` at ``details/requirements/solutions``) becomes :func:`merge_solutions`
    of what ``current`` holds (for a create, nothing: catalog details or id alone); any other
    path's value is returned unchanged. The catalog defaults to :func:`configured_catalog`."""
    if tuple(path) != SOLUTIONS_PATH or not isinstance(value, list):
        return value
    ids = [item.get("id") if isinstance(item, Mapping) else item for item in value]
    return merge_solutions(_held(current), ids, configured_catalog() if catalog is None else catalog)
