"""The Lambda authorizer on `$connect` (a REQUEST authorizer; identity: `?token=` or `Authorization`).

A person is let in with the shared token (from Secrets Manager or SSM, see `settings`), or, where a
Cognito user pool is configured, with a valid Cognito JWT (id or access token for the configured app
client). JWTs are checked with the standard library alone: RS256 signatures against the pool's JWKS
(fetched once per container), issuer, expiry and audience.

Missing token: raise "Unauthorized" (API Gateway answers 401). Wrong token: a Deny policy (403).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import time
import urllib.request

from lambda_bridge.logs import bind, logger
from lambda_bridge.settings import settings, shared_token

# DER prefix of a SHA-256 DigestInfo, for RSASSA-PKCS1-v1_5 (RFC 8017, section 9.2).
_SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")
_CLOCK_SKEW_S = 60


def handler(event: dict, context) -> dict:
    ctx = event.get("requestContext") or {}
    with bind(connection_id=ctx.get("connectionId"), route="authorizer", request_id=ctx.get("requestId")):
        log = logger()
        token = presented_token(event.get("queryStringParameters") or {}, event.get("headers") or {})
        if token is None:
            log.warning("refused: no token")
            raise Exception("Unauthorized")  # the exact message API Gateway turns into a 401
        principal = authenticate(token)
        if principal is None:
            log.warning("refused: the token is not valid")
            return policy("anonymous", "Deny", event["methodArn"])
        log.info("allowed %s", principal)
        return policy(principal, "Allow", event["methodArn"], {"principal": principal})


def presented_token(query: dict[str, str], headers: dict[str, str]) -> str | None:
    """`?token=` (browsers cannot set headers on a WebSocket), else `Authorization: Bearer ...`."""
    if query.get("token"):
        return query["token"]
    auth = next((v for k, v in headers.items() if k.lower() == "authorization"), "")
    if auth.lower().startswith("bearer ") and auth[7:].strip():
        return auth[7:].strip()
    return None


def authenticate(token: str) -> str | None:
    """The principal the token proves, or None. With no token configured anywhere, everyone is let in."""
    expected = shared_token()
    if expected is not None and hmac.compare_digest(token.encode(), expected.encode()):
        return "shared-token"
    s = settings()
    if s.cognito_user_pool_id and token.count(".") == 2:
        claims = verify_cognito_jwt(token)
        return f"cognito:{claims['sub']}" if claims else None
    if expected is None and not s.cognito_user_pool_id:
        return "anonymous"
    return None


def policy(principal: str, effect: str, resource: str, context: dict | None = None) -> dict:
    statement = {"Action": "execute-api:Invoke", "Effect": effect, "Resource": resource}
    result = {"principalId": principal, "policyDocument": {"Version": "2012-10-17", "Statement": [statement]}}
    if context:
        result["context"] = context
    return result


# ---- Cognito JWTs --------------------------------------------------------------------------------


def issuer() -> str:
    s = settings()
    return f"https://cognito-idp.{s.cognito_region}.amazonaws.com/{s.cognito_user_pool_id}"


@functools.cache
def signing_keys() -> dict[str, tuple[int, int]]:
    """kid → (modulus, exponent) of the pool's RSA keys; `COGNITO_JWKS_URL` overrides the address."""
    import os

    url = os.environ.get("COGNITO_JWKS_URL") or f"{issuer()}/.well-known/jwks.json"
    with urllib.request.urlopen(url, timeout=5) as response:
        jwks = json.load(response)
    return {
        key["kid"]: (int.from_bytes(_b64url(key["n"]), "big"), int.from_bytes(_b64url(key["e"]), "big"))
        for key in jwks.get("keys", [])
        if key.get("kty") == "RSA"
    }


def verify_cognito_jwt(token: str, now: float | None = None) -> dict | None:
    """The token's claims if it is a valid Cognito id/access token for the configured app client."""
    try:
        header_b64, payload_b64, signature_b64 = token.split(".")
        header = json.loads(_b64url(header_b64))
        claims = json.loads(_b64url(payload_b64))
        signature = _b64url(signature_b64)
    except (ValueError, TypeError):
        return None
    if not isinstance(header, dict) or not isinstance(claims, dict) or header.get("alg") != "RS256":
        return None
    key = signing_keys().get(header.get("kid"))
    if key is None or not _rsa_sha256_verify(key, f"{header_b64}.{payload_b64}".encode(), signature):
        return None
    now = time.time() if now is None else now
    client_id = settings().cognito_client_id
    audience = claims.get("aud") if claims.get("token_use") == "id" else claims.get("client_id")
    valid = (
        claims.get("iss") == issuer()
        and claims.get("token_use") in ("id", "access")
        and isinstance(claims.get("exp"), (int, float))
        and claims["exp"] > now - _CLOCK_SKEW_S
        and (client_id is None or audience == client_id)
        and isinstance(claims.get("sub"), str)
    )
    return claims if valid else None


def _rsa_sha256_verify(key: tuple[int, int], message: bytes, signature: bytes) -> bool:
    n, e = key
    size = (n.bit_length() + 7) // 8
    if len(signature) != size:
        return False
    decrypted = pow(int.from_bytes(signature, "big"), e, n).to_bytes(size, "big")
    digest = _SHA256_DIGEST_INFO + hashlib.sha256(message).digest()
    expected = b"\x00\x01" + b"\xff" * (size - len(digest) - 3) + b"\x00" + digest
    return hmac.compare_digest(decrypted, expected)


def _b64url(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
