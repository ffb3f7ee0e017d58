"""TrustedSession reads the environment's proxies and CA bundle once per host (issue 16): the
same settings as requests' own merge, a changed variable seen on the next request, and the
connection's ca_bundle still winning over REQUESTS_CA_BUNDLE (SPEC §4)."""

from __future__ import annotations

import pytest
import requests

from cosell_sync.hooks import http
from cosell_sync.hooks.http import ENVIRONMENT, TrustedSession

URL = "https://api.partner.microsoft.com/v1.0/engagements/referrals"
OTHER = "https://org.crm.dynamics.com/api/data/v9.2/opportunities"
LOCAL = "https://127.0.0.1:8443/v1.0/engagements/referrals"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)


ENVIRONMENTS = [
    {},
    {"HTTPS_PROXY": "http://proxy.corp:3128"},
    {"https_proxy": "http://lower.corp:3128", "HTTPS_PROXY": "http://upper.corp:3128"},
    {"HTTPS_PROXY": "http://proxy.corp:3128", "NO_PROXY": "127.0.0.1,localhost"},
    {"ALL_PROXY": "socks5://proxy.corp:1080", "no_proxy": ".dynamics.com"},
    {"HTTPS_PROXY": "http://proxy.corp:3128", "NO_PROXY": "*"},
    {"REQUESTS_CA_BUNDLE": "/etc/ssl/corp.pem"},
    {"CURL_CA_BUNDLE": "/etc/ssl/curl.pem", "HTTP_PROXY": "http://plain.corp:8080"},
]


@pytest.mark.parametrize("env", ENVIRONMENTS, ids=lambda e: ",".join(e) or "none")
@pytest.mark.parametrize("verify", [None, True, False, "/etc/ssl/mine.pem"])
def test_the_same_settings_as_requests_own_merge(monkeypatch, env, verify):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    ours, theirs = TrustedSession(), requests.Session()
    for url in (URL, OTHER, LOCAL):
        for _ in range(2):  # the second one from the kept answer
            assert ours.merge_environment_settings(url, {}, None, verify, None) == (
                theirs.merge_environment_settings(url, {}, None, verify, None)
            ), url


def test_a_request_of_its_own_proxies_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.corp:3128")
    merged = TrustedSession().merge_environment_settings(URL, {"https": "http://mine:1"}, None, None, None)
    assert merged["proxies"]["https"] == "http://mine:1"


def test_the_environment_is_read_once_per_host(monkeypatch):
    calls: list[str] = []
    real = http.get_environ_proxies

    def counted(url, no_proxy=None):
        calls.append(url)
        return real(url, no_proxy=no_proxy)

    monkeypatch.setattr(http, "get_environ_proxies", counted)
    session = TrustedSession()
    for path in ("/a", "/b", "/c"):
        session.merge_environment_settings(URL + path, {}, None, None, None)
    session.merge_environment_settings(OTHER, {}, None, None, None)
    assert len(calls) == 2


def test_a_changed_variable_applies_from_the_next_request(monkeypatch):
    session = TrustedSession()
    assert session.merge_environment_settings(URL, {}, None, None, None)["proxies"] == {}
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.corp:3128")
    assert session.merge_environment_settings(URL, {}, None, None, None)["proxies"]["https"] == "http://proxy.corp:3128"
    monkeypatch.setenv("NO_PROXY", "api.partner.microsoft.com")
    assert "https" not in session.merge_environment_settings(URL, {}, None, None, None)["proxies"]
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/corp.pem")
    assert session.merge_environment_settings(URL, {}, None, None, None)["verify"] == "/etc/ssl/corp.pem"


def test_without_trust_env_the_environment_is_not_read(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.corp:3128")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/corp.pem")
    session = TrustedSession()
    session.trust_env = False
    merged = session.merge_environment_settings(URL, {}, None, None, None)
    assert merged["proxies"] == {} and merged["verify"] is True


def test_the_connections_ca_bundle_wins_over_requests_ca_bundle(monkeypatch, tmp_path):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/corp.pem")
    bundle = str(tmp_path / "ca.pem")
    seen: dict[str, object] = {}

    def send(self, request, **kwargs):
        seen.update(kwargs)
        raise requests.ConnectionError("not sent")

    monkeypatch.setattr(requests.Session, "send", send)
    with pytest.raises(requests.ConnectionError):
        TrustedSession(bundle).get(URL)
    assert seen["verify"] == bundle
    seen.clear()
    with pytest.raises(requests.ConnectionError):
        TrustedSession().get(URL)
    assert seen["verify"] == "/etc/ssl/corp.pem"  # without a ca_bundle, REQUESTS_CA_BUNDLE is honoured
