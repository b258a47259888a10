"""The gateway emulator checks `@connections` signatures as AWS does (`devtools.sigv4`): botocore's own
signer signs the request again with the known secret. A request signed by boto3 with the right secret
passes (and meets the next check: 410 for a connection that is not there); a wrong secret, an unknown key,
a changed body or path, an old date or no signature at all get 403 with AWS's error type."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import boto3
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from devtools.local_gateway import LocalGateway
from devtools.sigv4 import SignatureRefused, verify

KNOWN = {"AKIDKNOWN": "the-secret"}
URL = "http://127.0.0.1:8766/local/%40connections/abc%3D"  # as boto3 sends it: the path percent-encoded


def signed(body: bytes = b'{"type": "x"}', secret: str = "the-secret", key: str = "AKIDKNOWN") -> dict:
    request = AWSRequest(method="POST", url=URL, data=body, headers={"Content-Type": "application/json"})
    SigV4Auth(Credentials(key, secret), "execute-api", "us-east-1").add_auth(request)
    return {k.lower(): v for k, v in request.headers.items()} | {"host": "127.0.0.1:8766"}


def test_a_request_signed_with_the_known_secret_passes():
    assert verify("POST", URL, signed(), b'{"type": "x"}', KNOWN, "execute-api") == "AKIDKNOWN"


@pytest.mark.parametrize(
    ("change", "error_type"),
    [
        ({"secret": "not-the-secret"}, "InvalidSignatureException"),
        ({"key": "AKIDSTRANGER"}, "UnrecognizedClientException"),
        ({"body": b'{"type": "y"}'}, "InvalidSignatureException"),  # signed one body, sent another
    ],
)
def test_a_wrong_signature_is_refused(change, error_type):
    headers = signed(**{k: v for k, v in change.items() if k != "body"})
    with pytest.raises(SignatureRefused) as refused:
        verify("POST", URL, headers, change.get("body", b'{"type": "x"}'), KNOWN, "execute-api")
    assert refused.value.error_type == error_type


def test_another_path_an_old_date_or_no_signature_is_refused():
    body = b'{"type": "x"}'
    with pytest.raises(SignatureRefused, match="does not match"):
        verify("POST", URL.replace("abc", "abd"), signed(), body, KNOWN, "execute-api")
    later = datetime.now(UTC) + timedelta(minutes=16)
    with pytest.raises(SignatureRefused, match="expired") as old:
        verify("POST", URL, signed(), body, KNOWN, "execute-api", now=later)
    assert old.value.error_type == "InvalidSignatureException"
    unsigned = {k: v for k, v in signed().items() if k != "authorization"}
    with pytest.raises(SignatureRefused) as missing:
        verify("POST", URL, unsigned, body, KNOWN, "execute-api")
    assert missing.value.error_type == "MissingAuthenticationTokenException"
    with pytest.raises(SignatureRefused) as service:
        verify("POST", URL, signed(), body, KNOWN, "s3")  # signed for execute-api
    assert service.value.error_type == "IncompleteSignatureException"


def management_client(gateway: LocalGateway, secret: str):
    return boto3.client(
        "apigatewaymanagementapi",
        endpoint_url=gateway.callback_url,
        region_name="us-east-1",
        aws_access_key_id="AKIDKNOWN",
        aws_secret_access_key=secret,
        config=Config(retries={"max_attempts": 1, "mode": "standard"}),
    )


def post(client, connection_id: str) -> str:
    try:
        client.post_to_connection(ConnectionId=connection_id, Data=b'{"type": "x"}')
    except ClientError as error:
        return f"{error.response['ResponseMetadata']['HTTPStatusCode']} {error.response['Error']['Code']}"
    return "200"


async def test_the_emulator_refuses_a_badly_signed_boto3_post():
    async with LocalGateway("http://127.0.0.1:9", credentials=KNOWN) as gateway:
        good = await asyncio.to_thread(post, management_client(gateway, "the-secret"), "gone=")
        bad = await asyncio.to_thread(post, management_client(gateway, "not-the-secret"), "gone=")
    assert good == "410 GoneException"  # the signature passed; the connection is not there
    assert bad == "403 InvalidSignatureException"
    assert gateway.refused_signatures == 1
