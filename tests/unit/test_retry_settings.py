"""The hooks' backoff comes from ``[cosell] http_retry_backoff`` and ``http_retry_backoff_max``
(defaults 0.5 s and 30 s); a bad value is a configuration error naming the setting; a policy
given explicitly wins; Retry-After is waited out whatever the backoff."""

from __future__ import annotations

import random

import pytest
import requests

from cosell_sync.errors import ConfigurationError
from cosell_sync.hooks.http import BACKOFF_BASE, BACKOFF_MAX, Retrier, RetryPolicy


def test_defaults_when_unset(monkeypatch):
    monkeypatch.delenv("AIRFLOW__COSELL__HTTP_RETRY_BACKOFF", raising=False)
    monkeypatch.delenv("AIRFLOW__COSELL__HTTP_RETRY_BACKOFF_MAX", raising=False)
    policy = RetryPolicy()
    assert (policy.backoff_base, policy.backoff_max) == (BACKOFF_BASE, BACKOFF_MAX) == (0.5, 30.0)


def test_settings_shape_the_backoff(monkeypatch):
    monkeypatch.setenv("AIRFLOW__COSELL__HTTP_RETRY_BACKOFF", "2")
    monkeypatch.setenv("AIRFLOW__COSELL__HTTP_RETRY_BACKOFF_MAX", "5")
    policy = RetryPolicy()
    rng = random.Random(1)
    delays = [policy.backoff(attempt, rng) for attempt in range(1, 6)]
    assert 1 <= delays[0] <= 2 and 2 <= delays[1] <= 4
    assert all(2.5 <= d <= 5 for d in delays[2:])
    assert RetryPolicy(backoff_base=0.01).backoff_base == 0.01  # an explicit policy wins


@pytest.mark.parametrize("value", ["0", "-1", "soon", "inf", "nan"])
def test_a_bad_value_names_the_setting(monkeypatch, value):
    monkeypatch.setenv("AIRFLOW__COSELL__HTTP_RETRY_BACKOFF", value)
    with pytest.raises(ConfigurationError, match=r"\[cosell\] http_retry_backoff must be a positive number"):
        RetryPolicy()


def test_retry_after_is_waited_out_in_full_with_a_short_backoff(monkeypatch):
    monkeypatch.setenv("AIRFLOW__COSELL__HTTP_RETRY_BACKOFF", "0.001")
    slept: list[float] = []
    answers = iter([(429, {"Retry-After": "7"}), (503, {}), (200, {})])

    def send() -> requests.Response:
        status, headers = next(answers)
        response = requests.Response()
        response.status_code, response.headers = status, requests.structures.CaseInsensitiveDict(headers)
        return response

    retrier = Retrier("Partner Center", sleep=slept.append, seed=3)
    assert retrier.run("GET", "https://example.invalid/x", send, idempotent=True).status_code == 200
    assert slept[0] == 7 and 0.001 <= slept[1] <= 0.002  # the second attempt: 0.001 · 2, with jitter
