"""Checks a request's AWS Signature Version 4 as AWS does: the same request is signed again with
botocore's own signer and the secret of the access key it names, and the two signatures must match.

AWS answers a bad signature with 403 and an `x-amzn-ErrorType`; `SignatureRefused` carries both, with
AWS's wording, so a client's error handling sees what it would see in production.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Mapping
from datetime import UTC, datetime

from botocore.auth import SIGV4_TIMESTAMP, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

ALGORITHM = "AWS4-HMAC-SHA256"
MAX_SKEW_S = 15 * 60  # AWS refuses a signature dated more than 15 minutes from its clock
_FIELDS = re.compile(r"(Credential|SignedHeaders|Signature)=([^,\s]+)")


class SignatureRefused(Exception):
    """403, as AWS returns it: `error_type` goes in `x-amzn-ErrorType`, the message in the body."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message


def verify(
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    credentials: Mapping[str, str],
    service: str,
    now: datetime | None = None,
) -> str:
    """The access key that signed the request; raises SignatureRefused otherwise.

    `url` is the request's target exactly as sent (still percent-encoded: SigV4 signs the encoded path),
    with scheme and host; `headers` have lower-case names; `credentials` maps access keys to secrets."""
    authorization = headers.get("authorization", "")
    if not authorization:
        raise SignatureRefused("MissingAuthenticationTokenException", "Missing Authentication Token")
    algorithm, _, rest = authorization.partition(" ")
    fields = dict(_FIELDS.findall(rest))
    if algorithm != ALGORITHM or set(fields) != {"Credential", "SignedHeaders", "Signature"}:
        raise SignatureRefused(
            "IncompleteSignatureException",
            f"Authorization header requires 'Credential', 'SignedHeaders' and 'Signature' ({ALGORITHM}).",
        )
    scope = fields["Credential"].split("/")
    if len(scope) != 5 or scope[3] != service or scope[4] != "aws4_request":
        raise SignatureRefused("IncompleteSignatureException", f"Credential scope {fields['Credential']!r}")
    access_key, day, region = scope[0], scope[1], scope[2]
    secret = credentials.get(access_key)
    if secret is None:
        raise SignatureRefused(
            "UnrecognizedClientException", "The security token included in the request is invalid."
        )
    stamp = headers.get("x-amz-date", "")
    try:
        signed_at = datetime.strptime(stamp, SIGV4_TIMESTAMP).replace(tzinfo=UTC)
    except ValueError:
        raise SignatureRefused("IncompleteSignatureException", "X-Amz-Date is missing or malformed") from None
    skew = abs(((now or datetime.now(UTC)) - signed_at).total_seconds())
    if skew > MAX_SKEW_S or day != stamp[:8]:
        raise SignatureRefused("InvalidSignatureException", f"Signature expired: {stamp} is too far from now")
    names = fields["SignedHeaders"].split(";")
    if "host" not in names or any(name not in headers for name in names):
        raise SignatureRefused("IncompleteSignatureException", "Signed headers are missing from the request.")

    # Only the headers the client signed take part, as AWS computes it.
    request = AWSRequest(method=method, url=url, data=body, headers={n: headers[n] for n in names})
    request.context["timestamp"] = stamp
    signer = SigV4Auth(Credentials(access_key, secret), service, region)
    expected = signer.signature(signer.string_to_sign(request, signer.canonical_request(request)), request)
    if not hmac.compare_digest(expected, fields["Signature"]):
        raise SignatureRefused(
            "InvalidSignatureException",
            "The request signature we calculated does not match the signature you provided. Check your "
            "AWS Secret Access Key and signing method.",
        )
    return access_key
