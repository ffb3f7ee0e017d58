"""The host check the receiver and the signature check share (cosell_sync/webhooks/hosts.py)."""

import pytest

from cosell_sync.webhooks.hosts import on_allowed_host, split_https_url

ALLOWED = ("api.partner.microsoft.com", " ", "[::1]")


@pytest.mark.parametrize(
    ("host", "root_dot", "allowed"),
    [
        ("API.Partner.Microsoft.com", False, True),
        ("api.partner.microsoft.com.", False, False),  # another spelling: the receiver refuses it
        ("api.partner.microsoft.com.", True, True),  # the certificate URL check takes the root's dot
        ("::1", False, True),
        ("partner.microsoft.com", True, False),
        ("", True, False),
    ],
)
def test_a_host_is_allowed_only_when_it_is_on_the_list(host: str, root_dot: bool, allowed: bool):
    assert on_allowed_host(host, ALLOWED, root_dot=root_dot) is allowed


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://api.partner.microsoft.com/x", "the URL must be https"),
        ("https://user@api.partner.microsoft.com/x", "the URL has no plain host"),
        ("https:///x", "the URL has no plain host"),
        ("https://api.partner.microsoft.com:99999/x", "the URL is malformed"),
        ("https://[::1/x", "the URL is malformed"),
    ],
)
def test_split_https_url_names_what_it_checked(url: str, message: str):
    with pytest.raises(LookupError, match=f"^{message}$"):
        split_https_url(url, LookupError, "the URL")


def test_split_https_url_gives_the_parts_host_and_port():
    parts, host, port = split_https_url("HTTPS://Api.Partner.Microsoft.com:8443/v1/x", LookupError, "the URL")
    assert (parts.path, host, port) == ("/v1/x", "api.partner.microsoft.com", 8443)
