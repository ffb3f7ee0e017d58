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


# -- prepare_request: requests' own merge of the session's and the request's settings -------------------
REQUESTS = [
    {"headers": {"Authorization": "Bearer t", "If-Match": 'W/"1"'}, "json": [{"op": "add", "path": "/a", "value": 1}]},
    {"headers": {"accept": "text/plain", "User-Agent": None}, "params": {"$top": "100", "$skip": None}},
    {"headers": None, "data": {"grant_type": "refresh_token", "scope": "x"}},
    {"headers": {"X-One": "1"}, "params": [("a", "1"), ("a", "2")], "cookies": {"affinity": "abc"}},
    {"auth": ("user", "secret"), "data": b"raw", "hooks": {"response": [lambda r, **kw: r]}},
]


def _prepared(session, method, **kwargs):
    return session.prepare_request(requests.Request(method, URL, **{"params": {}, "data": {}, **kwargs}))


@pytest.mark.parametrize("kwargs", REQUESTS, ids=range(len(REQUESTS)))
def test_prepare_request_is_requests_own(monkeypatch, tmp_path, kwargs):
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    ours, theirs = TrustedSession(), requests.Session()
    for session in (ours, theirs):
        session.headers["User-Agent"] = "cosell-sync"
        session.params = {"api-version": "1"}
        session.cookies.set("session", "s1", domain="api.partner.microsoft.com")
    a, b = _prepared(ours, "post", **kwargs), _prepared(theirs, "post", **kwargs)
    assert (a.method, a.url, a.body) == (b.method, b.url, b.body)
    assert dict(a.headers) == dict(b.headers)
    assert {k: len(v) for k, v in a.hooks.items()} == {k: len(v) for k, v in b.hooks.items()}


def test_a_netrc_entry_never_replaces_a_requests_own_bearer_token(monkeypatch, tmp_path):
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.partner.microsoft.com login someone password secret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    bearer = _prepared(TrustedSession(), "GET", headers={"Authorization": "Bearer t"})
    assert bearer.headers["Authorization"] == "Bearer t"
    # without one of its own (msal's token requests), the netrc entry applies as in requests
    plain = _prepared(TrustedSession(), "GET", headers={"Accept": "application/json"})
    assert plain.headers["Authorization"] == _prepared(requests.Session(), "GET").headers["Authorization"]
    assert plain.headers["Authorization"].startswith("Basic ")
