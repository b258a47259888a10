"""The authorizer's Cognito JWT checks, gap by gap (issue 17): real RSA keys, really signed tokens, and a
real JWKS served over HTTP on loopback. `test_lambda_bridge.py` has the happy path and the shared token."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from lambda_bridge import authorizer, settings
from tests.standins import http_server

ARN = "arn:aws:execute-api:eu-west-1:000000000000:api/prod/$connect"
ISSUER = "https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_pool"
CLIENT = "app-client"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwk(kid: str, key: rsa.RSAPrivateKey) -> dict:
    numbers = key.public_key().public_numbers()
    as_b64 = lambda n: b64(n.to_bytes((n.bit_length() + 7) // 8, "big"))  # noqa: E731
    return {
        "kty": "RSA",
        "kid": kid,
        "alg": "RS256",
        "use": "sig",
        "n": as_b64(numbers.n),
        "e": as_b64(numbers.e),
    }


def sign(key: rsa.RSAPrivateKey, header: object, claims: object) -> str:
    head, body = b64(json.dumps(header).encode()), b64(json.dumps(claims).encode())
    return f"{head}.{body}.{b64(key.sign(f'{head}.{body}'.encode(), padding.PKCS1v15(), hashes.SHA256()))}"


def id_claims(**changes) -> dict:
    now = time.time()
    return {
        "sub": "user-1",
        "iss": ISSUER,
        "token_use": "id",
        "aud": CLIENT,
        "iat": now,
        "exp": now + 600,
    } | changes


def effect(token: str) -> str:
    event = {"type": "REQUEST", "methodArn": ARN, "queryStringParameters": {"token": token}, "headers": {}}
    result = authorizer.handler({**event, "requestContext": {"connectionId": "c1="}}, None)
    return result["policyDocument"]["Statement"][0]["Effect"]


@pytest.fixture(scope="module")
def keys() -> dict[str, rsa.RSAPrivateKey]:
    """Generated once (that is the slow part). `odd` is 2047 bits, so s + n still fits in its 256 bytes."""
    return {
        kid: rsa.generate_private_key(public_exponent=65537, key_size=bits)
        for kid, bits in (("k1", 2048), ("k2", 2048), ("odd", 2047))
    }


@dataclass
class Pool:
    """A Cognito user pool as the authorizer sees it: the keys its JWKS publishes now, and who fetched it."""

    published: dict[str, rsa.RSAPrivateKey]
    fetches: list = field(default_factory=list)

    def token(self, kid: str = "k1", claims: object = None, header: object = None) -> str:
        return sign(self.published[kid], header or {"alg": "RS256", "kid": kid}, claims or id_claims())


def use_pool(monkeypatch, jwks_url: str) -> None:
    """Point the authorizer at a user pool whose JWKS is served at `jwks_url` (app client `CLIENT`)."""
    for name, value in (
        ("COGNITO_USER_POOL_ID", "eu-west-1_pool"),
        ("COGNITO_CLIENT_ID", CLIENT),
        ("COGNITO_REGION", "eu-west-1"),
        ("COGNITO_JWKS_URL", jwks_url),
    ):
        monkeypatch.setenv(name, value)
    settings.reset()
    authorizer.signing_keys.cache_clear()


def leave_pool() -> None:
    settings.reset()
    authorizer.signing_keys.cache_clear()


@pytest.fixture
def pool(monkeypatch, keys) -> Iterator[Pool]:
    published = {"k1": keys["k1"], "odd": keys["odd"]}
    jwks = lambda *_: (200, {}, json.dumps({"keys": [jwk(k, v) for k, v in published.items()]}).encode())  # noqa: E731
    with http_server(jwks) as (url, seen):
        for name in ("TOKEN", "TOKEN_SECRET_ARN", "TOKEN_PARAMETER", "AUTH_MODE"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("SERVE_URL", "http://127.0.0.1:9")
        use_pool(monkeypatch, url)
        yield Pool(published, seen)
    leave_pool()


# (a) RFC 8017: RSAVP1 step 1 (s < n) and RSASSA-PKCS1-v1_5 step 1 (length).
def test_a_signature_of_s_plus_n_or_of_another_length_is_refused(pool):
    token = pool.token("odd")
    assert effect(token) == "Allow"
    signed, signature = token.rsplit(".", 1)
    n = pool.published["odd"].public_key().public_numbers().n
    s = int.from_bytes(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)), "big")
    assert effect(f"{signed}.{b64((s + n).to_bytes(256, 'big'))}") == "Deny"  # same s mod n, s >= n
    assert effect(f"{signed}.{b64(s.to_bytes(257, 'big'))}") == "Deny"  # a leading zero byte


# (b) Whatever a token holds, the answer is a Deny (403), never an exception (a 500).
def test_a_malformed_header_or_payload_is_a_deny_not_an_error(pool):
    key = pool.published["k1"]
    for header in (
        {"alg": "RS256", "kid": ["k1"]},  # unhashable: was a TypeError
        {"alg": "RS256", "kid": {"k": 1}},
        {"alg": "RS256", "kid": 1},
        {"alg": "RS256"},
        {"kid": "k1"},
        {"alg": ["RS256"], "kid": "k1"},
        {"alg": None, "kid": "k1"},
        ["RS256", "k1"],
        "RS256",
        None,
    ):
        assert effect(sign(key, header, id_claims())) == "Deny", header
    for claims in (["sub"], "claims", None, 1):
        assert effect(sign(key, {"alg": "RS256", "kid": "k1"}, claims)) == "Deny", claims
    nested = b64(b"[" * 100_000)  # json.loads gives up with RecursionError
    head = b64(json.dumps({"alg": "RS256", "kid": "k1"}).encode())
    for token in (f"{nested}.{nested}.{nested}", f"{head}.{nested}.AAAA", f"{head}.é.AAAA", "..", "a.b.c"):
        assert effect(token) == "Deny", token[:40]


# (c) Fail closed: the app clients must be named, and only they get in.
def test_cognito_without_an_app_client_is_a_configuration_error(pool, monkeypatch):
    env = {"SERVE_URL": "http://x", "COGNITO_USER_POOL_ID": "eu-west-1_pool"}
    for missing in ({}, {"COGNITO_CLIENT_ID": ""}, {"COGNITO_CLIENT_ID": " , "}):
        with pytest.raises(ValueError, match="COGNITO_CLIENT_ID"):
            settings.Settings.from_env(env | missing)
    monkeypatch.delenv("COGNITO_CLIENT_ID")
    settings.reset()
    with pytest.raises(ValueError, match="COGNITO_CLIENT_ID"):
        effect(pool.token())  # a failed invocation (500): never an Allow for any client of the pool


def test_only_the_configured_app_clients_are_accepted(pool, monkeypatch):
    monkeypatch.setenv("COGNITO_CLIENT_ID", f"{CLIENT}, second-client")
    settings.reset()
    assert settings.settings().cognito_client_ids == (CLIENT, "second-client")
    access = id_claims(token_use="access", client_id="second-client")
    del access["aud"]
    assert effect(pool.token(claims=id_claims())) == "Allow"
    assert effect(pool.token(claims=access)) == "Allow"
    for claims in (
        id_claims(aud="other-client"),
        id_claims(aud=[CLIENT]),
        access | {"client_id": "other-client"},
    ):
        assert effect(pool.token(claims=claims)) == "Deny", claims


# (d) Lifetime: exp required and a number; nbf and iat not in the future, with CLOCK_LEEWAY_S of leeway.
def test_a_token_not_yet_valid_or_issued_in_the_future_is_refused(pool):
    now, leeway = time.time(), authorizer.CLOCK_LEEWAY_S
    within, beyond = now + leeway - 10, now + leeway + 10
    for claims in (id_claims(nbf=within), id_claims(iat=within), id_claims(exp=now - leeway + 10)):
        assert effect(pool.token(claims=claims)) == "Allow", claims
    without_exp = id_claims()
    del without_exp["exp"]
    for claims in (
        id_claims(nbf=beyond),
        id_claims(iat=beyond),
        id_claims(exp=now - leeway - 10),
        id_claims(exp=str(now + 600)),
        id_claims(exp=float("inf")),  # json.dumps writes Infinity, and json.loads reads it
        id_claims(exp=True),
        without_exp,
        id_claims(nbf=str(now)),
        id_claims(iat=None),
    ):
        assert effect(pool.token(claims=claims)) == "Deny", claims


# (e) Key rotation: an unknown kid refetches the JWKS, at most once per JWKS_REFETCH_INTERVAL_S.
def test_an_unknown_kid_refetches_the_jwks_at_most_once_per_interval(pool, keys, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(authorizer, "signing_keys", authorizer.SigningKeys(clock=lambda: clock[0]))
    interval = authorizer.JWKS_REFETCH_INTERVAL_S
    old = pool.token("k1")
    assert effect(old) == "Allow" and len(pool.fetches) == 1

    del pool.published["k1"]  # Cognito rotates: k2 in, k1 out
    pool.published["k2"] = keys["k2"]
    clock[0] += interval
    assert effect(pool.token("k2")) == "Allow" and len(pool.fetches) == 2

    flood = sign(keys["k2"], {"alg": "RS256", "kid": "made-up"}, id_claims())
    for _ in range(50):
        clock[0] += 1
        assert effect(flood) == "Deny"
    assert len(pool.fetches) == 2  # the flood cost Cognito nothing

    clock[0] += interval
    assert effect(flood) == "Deny" and len(pool.fetches) == 3  # still unknown after the refetch
    assert effect(old) == "Deny"  # a key Cognito dropped is no longer trusted
    assert effect(pool.token("k2")) == "Allow" and len(pool.fetches) == 3
