"""Registering secrets with Airflow's masker, so they never reach task logs."""

from __future__ import annotations

from collections.abc import Callable


def _secret_masker() -> Callable[[str], None]:
    try:
        from airflow.sdk.log import mask_secret
    except ImportError:  # pragma: no cover - the engine is importable without Airflow
        return lambda _value: None
    return lambda value: mask_secret(value)


mask = _secret_masker()
