"""$batch encoding/decoding and Dataverse addressing, without any network."""

from __future__ import annotations

import json

import pytest

from cosell_sync.hooks.batch import (
    BatchParseError,
    BatchRequest,
    ChangeSet,
    build_batch,
    entity_id_from_url,
    parse_batch,
)
from cosell_sync.hooks.dynamics365 import DynamicsHook
from cosell_sync.hooks.odata import with_query

GUID = "a69b6e6e-0d8e-4f47-9e6b-7ad4c1a0b001"


def test_build_batch_wire_format():
    ctype, body = build_batch(
        [
            ChangeSet(
                [
                    BatchRequest("POST", "accounts", {"name": "Contoso"}),
                    BatchRequest("PATCH", f"contacts({GUID})", {"parentcustomerid_account@odata.bind": "$1"}),
                ]
            ),
            BatchRequest("GET", "WhoAmI"),
        ],
        "/api/data/v9.2",
    )
    text = body.decode()
    boundary = ctype.split("boundary=")[1]
    assert ctype.startswith("multipart/mixed; boundary=batch_")
    assert "\r\n" in text and "\n" not in text.replace("\r\n", "")  # CRLF only
    assert text.startswith(f"--{boundary}\r\nContent-Type: multipart/mixed; boundary=changeset_")
    assert text.rstrip().endswith(f"--{boundary}--")
    assert (
        "Content-ID: 1\r\n\r\nPOST /api/data/v9.2/accounts HTTP/1.1\r\nContent-Type: application/json; type=entry"
        in text
    )
    assert "Content-ID: 2\r\n\r\nPATCH /api/data/v9.2/contacts(" in text
    assert '{"name":"Contoso"}' in text
    assert "GET /api/data/v9.2/WhoAmI HTTP/1.1\r\nAccept: application/json" in text


def test_build_batch_limits():
    with pytest.raises(ValueError, match="at most 1000"):
        build_batch([BatchRequest("DELETE", f"accounts({GUID})")] * 1001, "/api/data/v9.2")
    with pytest.raises(ValueError, match="GET"):
        build_batch([ChangeSet([BatchRequest("GET", "accounts")])], "/api/data/v9.2")
    with pytest.raises(ValueError, match="at least one"):
        build_batch([], "/api/data/v9.2")


DOCUMENTED_RESPONSE = (
    "--batchresponse_c1bd45c1-dd81-470d-b897-e965846aad2f\r\n"
    "Content-Type: multipart/mixed; boundary=changesetresponse_ff83b4f1-ab48-430c-b81c-926a2c596abc\r\n"
    "\r\n"
    "--changesetresponse_ff83b4f1-ab48-430c-b81c-926a2c596abc\r\n"
    "Content-Type: application/http\r\n"
    "Content-Transfer-Encoding: binary\r\n"
    "Content-ID: 1\r\n"
    "\r\n"
    "HTTP/1.1 204 No Content\r\n"
    "OData-Version: 4.0\r\n"
    f"Location: https://org.crm.dynamics.com/api/data/v9.2/tasks({GUID})\r\n"
    f"OData-EntityId: https://org.crm.dynamics.com/api/data/v9.2/tasks({GUID})\r\n"
    "\r\n"
    "\r\n"
    "--changesetresponse_ff83b4f1-ab48-430c-b81c-926a2c596abc--\r\n"
    "--batchresponse_c1bd45c1-dd81-470d-b897-e965846aad2f\r\n"
    "Content-Type: application/http\r\n"
    "Content-Transfer-Encoding: binary\r\n"
    "\r\n"
    "HTTP/1.1 400 Bad Request\r\n"
    "Content-Type: application/json; odata.metadata=minimal\r\n"
    "OData-Version: 4.0\r\n"
    "\r\n"
    + json.dumps({"error": {"code": "0x80040203", "message": "Invalid value for name"}})
    + "\r\n--batchresponse_c1bd45c1-dd81-470d-b897-e965846aad2f--\r\n"
)


def test_parse_documented_batch_response():
    responses = parse_batch(
        "multipart/mixed; boundary=batchresponse_c1bd45c1-dd81-470d-b897-e965846aad2f", DOCUMENTED_RESPONSE
    )
    assert [r.status for r in responses] == [204, 400]
    assert responses[0].content_id == "1" and responses[0].ok and responses[0].entity_id == GUID
    assert responses[1].error_code == "0x80040203" and not responses[1].ok
    assert responses[1].error_message == "Invalid value for name"


def test_parse_rejects_garbage():
    with pytest.raises(BatchParseError):
        parse_batch("multipart/mixed", "whatever")
    with pytest.raises(BatchParseError):
        parse_batch("multipart/mixed; boundary=b", "--b\r\nContent-Type: application/http\r\n\r\nnot http\r\n--b--")


def test_entity_id_from_url():
    assert entity_id_from_url(f"https://x/api/data/v9.2/accounts({GUID.upper()})") == GUID
    assert entity_id_from_url("https://x/api/data/v9.2/accounts(name='x')") is None
    assert entity_id_from_url(None) is None


def test_alternate_key_quotes_and_escapes():
    url = DynamicsHook.alternate_key("opportunities", cosell_referralid="O'Brien) or (x eq 'y")
    assert url == "opportunities(cosell_referralid='O''Brien%29%20or%20%28x%20eq%20''y')"


def test_row_refuses_non_guids():
    assert DynamicsHook.row("accounts", GUID.upper()) == f"accounts({GUID})"
    with pytest.raises(ValueError, match="GUID"):
        DynamicsHook.row("accounts", "x)/../contacts(y")
    assert DynamicsHook.bind("accounts", GUID) == f"/accounts({GUID})"


def test_with_query_encodes_values_not_quotes():
    url = with_query("https://h/api/data/v9.2/accounts", {"$filter": "name eq 'A & B'", "$select": "name,accountid"})
    assert url == "https://h/api/data/v9.2/accounts?$filter=name%20eq%20'A%20%26%20B'&$select=name,accountid"
