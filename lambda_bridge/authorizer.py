"""The Lambda authorizer on `$connect` (a REQUEST authorizer; identity: `?token=` or `Authorization`).

A person is let in with the shared token (from Secrets Manager or SSM, see `settings`), or, where a
Cognito user pool is configured, with a valid Cognito JWT (id or access token for the configured app
client). JWTs are checked with the standard library alone: RS256 signatures against the pool's JWKS
(fetched once per container, and again when a token names a key it lacks), issuer, audience, token use,
and expiry, not-before and issued-at with `CLOCK_LEEWAY_S` of leeway.

Missing token: raise "Unauthorized" (API Gateway answers 401). Wrong token: a Deny policy (403).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import os
import time
import urllib.request
from collections.abc import Callable

from lambda_bridge.logs import bind, logger
from lambda_bridge.settings import settings, shared_token

# DER prefix of a SHA-256 DigestInfo, for RSASSA-PKCS1-v1_5 (RFC 8017, section 9.2).
_SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")
# How far the pool's clock and ours may disagree, for `exp`, `nbf` and `iat`.
CLOCK_LEEWAY_S = 60.0
# A token naming an unknown key refetches the JWKS (Cognito rotates keys), but at most this often per
# container: a flood of made-up kids then costs Cognito one request a minute, and a rotation is seen
# within a minute.
JWKS_REFETCH_INTERVAL_S = 60.0


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
    """The principal the token proves, or None. With no token configured anywhere, everyone is let in
    only where that was asked for (`CSM_ALLOW_ANONYMOUS=1`): a missing secret never opens the door."""
    expected = shared_token()
    if expected is not None and hmac.compare_digest(token.encode(), expected.encode()):
        return "shared-token"
    s = settings()
    if s.cognito_user_pool_id and token.count(".") == 2:
        claims = verify_cognito_jwt(token)  # a valid token always has a string `sub`
        return f"cognito:{claims['sub']}" if claims else None
    if expected is None and not s.cognito_user_pool_id:
        if os.environ.get("CSM_ALLOW_ANONYMOUS") == "1":
            return "anonymous"
        logger().error("no token and no user pool configured, and CSM_ALLOW_ANONYMOUS is not 1: refused")
    return None


def policy(principal: str, effect: str, resource: str, context: dict | None = None) -> dict:
    statement = {"Action": "execute-api:Invoke", "Effect": effect, "Resource": resource}
    result = {"principalId": principal, "policyDocument": {"Version": "2012-10-17", "Statement": [statement]}}
    if context:
        result["context"] = context
    return result


# ---- Cognito JWTs --------------------------------------------------------------------------------

RsaKey = tuple[int, int]  # (modulus, public exponent)


def issuer() -> str:
    s = settings()
    return f"https://cognito-idp.{s.cognito_region}.amazonaws.com/{s.cognito_user_pool_id}"


def fetch_jwks() -> dict[str, RsaKey]:
    """kid → key for the pool's RSA keys; `COGNITO_JWKS_URL` overrides the address."""
    url = os.environ.get("COGNITO_JWKS_URL") or f"{issuer()}/.well-known/jwks.json"
    with urllib.request.urlopen(url, timeout=5) as response:
        jwks = json.load(response)
    return {
        key["kid"]: (int.from_bytes(_b64url(key["n"]), "big"), int.from_bytes(_b64url(key["e"]), "big"))
        for key in jwks.get("keys", [])
        if key.get("kty") == "RSA" and isinstance(key.get("kid"), str)
    }


class SigningKeys:
    """The pool's keys, fetched on first use and refetched, rate-limited, for a kid not among them.

    A Lambda container serves one request at a time, so there is no lock. A failed fetch raises (a 500,
    counted in the function's errors), but still counts towards the rate limit.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.cache_clear()

    def get(self, kid: str) -> RsaKey | None:
        if self._keys is None or (kid not in self._keys and self._may_refetch()):
            self._fetched_at = self.clock()
            self._keys = fetch_jwks()  # replaces the old set: a key Cognito dropped is no longer trusted
        return self._keys.get(kid)

    def cache_clear(self) -> None:
        """Forget the keys (tests; named as `functools.cache` names it, as the other caches are)."""
        self._keys: dict[str, RsaKey] | None = None
        self._fetched_at = -math.inf

    def _may_refetch(self) -> bool:
        return self.clock() - self._fetched_at >= JWKS_REFETCH_INTERVAL_S


signing_keys = SigningKeys()


def verify_cognito_jwt(token: str, now: float | None = None) -> dict | None:
    """The token's claims if it is a valid Cognito id/access token for a configured app client.

    Any malformed token is None (a Deny), never an exception (a 500).
    """
    decoded = _decode(token)
    if decoded is None:
        return None
    header, claims, signed, signature = decoded
    kid = header.get("kid")
    if header.get("alg") != "RS256" or not isinstance(kid, str):
        return None
    key = signing_keys.get(kid)
    if key is None or not _rsa_sha256_verify(key, signed, signature):
        return None
    return claims if _claims_valid(claims, time.time() if now is None else now) else None


def _decode(token: str) -> tuple[dict, dict, bytes, bytes] | None:
    """(header, claims, signed bytes, signature), or None for anything that is not a JWS of two objects."""
    try:
        header_b64, payload_b64, signature_b64 = token.split(".")
        header = json.loads(_b64url(header_b64))
        claims = json.loads(_b64url(payload_b64))
        signature = _b64url(signature_b64)
    except (ValueError, TypeError, RecursionError):  # RecursionError: `[[[[...` nested past the limit
        return None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        return None
    return header, claims, f"{header_b64}.{payload_b64}".encode(), signature


def _claims_valid(claims: dict, now: float) -> bool:
    token_use = claims.get("token_use")
    # An id token names its app client in `aud`, an access token in `client_id`.
    audience = claims.get("aud") if token_use == "id" else claims.get("client_id")
    return (
        claims.get("iss") == issuer()
        and token_use in ("id", "access")
        and isinstance(audience, str)
        and audience in settings().cognito_client_ids
        and isinstance(claims.get("sub"), str)
        and _within_lifetime(claims, now)
    )


def _within_lifetime(claims: dict, now: float) -> bool:
    """`exp` is required; `nbf` and `iat` are optional (RFC 7519) but, when present, not in the future."""
    exp, not_before, issued_at = claims.get("exp"), claims.get("nbf", now), claims.get("iat", now)
    if not all(_is_time(value) for value in (exp, not_before, issued_at)):
        return False
    return exp > now - CLOCK_LEEWAY_S and max(not_before, issued_at) <= now + CLOCK_LEEWAY_S


def _is_time(value: object) -> bool:
    # bool is an int in Python, and json.loads reads NaN and Infinity: none of them is a time.
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


def _rsa_sha256_verify(key: RsaKey, message: bytes, signature: bytes) -> bool:
    """RSASSA-PKCS1-v1_5 verification (RFC 8017, section 8.2.2) by encode-and-compare."""
    n, e = key
    size = (n.bit_length() + 7) // 8
    s = int.from_bytes(signature, "big")
    # Step 1 (length) and RSAVP1's step 1 (s < n): otherwise s + n, or s with a leading zero byte, would
    # verify as s does, and a signature would not be unique.
    if len(signature) != size or s >= n:
        return False
    decrypted = pow(s, e, n).to_bytes(size, "big")
    digest = _SHA256_DIGEST_INFO + hashlib.sha256(message).digest()
    expected = b"\x00\x01" + b"\xff" * (size - len(digest) - 3) + b"\x00" + digest
    return hmac.compare_digest(decrypted, expected)


def _b64url(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
