"""The local Cognito stand-in (devtools/local_oidc.py) over real HTTP: its tokens pass the authorizer's own
verification (its JWKS fetched from the stand-in), and it refuses what Cognito refuses (a wrong PKCE
verifier, a code used twice, a revoked refresh token, an unregistered client or redirect_uri)."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import urllib.error
import urllib.request
from collections.abc import Iterator
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest

from devtools.local_oidc import LocalOidc, s256
from lambda_bridge import authorizer, settings

REGION, POOL, CLIENT = "eu-west-1", "eu-west-1_standin", "page-client"
CALLBACK = "http://127.0.0.1:5173/"
ARN = "arn:aws:execute-api:eu-west-1:000000000000:api/prod/$connect"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # a 3xx comes back as an HTTPError, with its Location to read


_opener = urllib.request.build_opener(_NoRedirect)


def request(url: str, form: dict | None = None, headers: dict | None = None) -> tuple[int, dict, bytes]:
    data = urlencode(form).encode() if form is not None else None
    req = urllib.request.Request(url, data=data, headers=headers or {})
    if data is not None:
        req.add_header("Content-Type", "application/x-www-form-urlencoded")
    try:
        with _opener.open(req, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def claims(token: str) -> dict:
    body = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))


@pytest.fixture(scope="module")
def oidc() -> Iterator[LocalOidc]:
    with LocalOidc(
        users={"alice": "wonderland", "bob": "builder"},
        client_id=CLIENT,
        callback_urls=[CALLBACK],
        region=REGION,
        pool_id=POOL,
        access_token_seconds=120,
    ) as server:
        yield server


@pytest.fixture
def pool(monkeypatch, oidc):
    """The authorizer configured for the stand-in's pool, with its JWKS at the stand-in."""
    for name in ("TOKEN", "TOKEN_SECRET_ARN", "TOKEN_PARAMETER", "AUTH_MODE", "CSM_ALLOW_ANONYMOUS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SERVE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("COGNITO_USER_POOL_ID", POOL)
    monkeypatch.setenv("COGNITO_CLIENT_ID", CLIENT)
    monkeypatch.setenv("COGNITO_REGION", REGION)
    monkeypatch.setenv("COGNITO_JWKS_URL", f"{oidc.url}/.well-known/jwks.json")
    settings.reset()
    authorizer.signing_keys.cache_clear()
    yield
    settings.reset()
    authorizer.signing_keys.cache_clear()


def authorize_params(verifier: str, state: str = "st-1", **changes: str) -> dict:
    return {
        "response_type": "code",
        "client_id": CLIENT,
        "redirect_uri": CALLBACK,
        "scope": "openid email profile",
        "state": state,
        "code_challenge": s256(verifier),
        "code_challenge_method": "S256",
    } | changes


def log_in(oidc: LocalOidc, verifier: str, user: str = "alice", password: str = "wonderland", state="st-1"):
    """The browser's part: the form, then its POST; returns (code, session cookie)."""
    params = authorize_params(verifier, state)
    status, _, page = request(f"{oidc.url}/oauth2/authorize?{urlencode(params)}")
    assert status == 200 and b'name="password"' in page
    fields = dict(re.findall(rb'<input type="hidden" name="(\w+)" value="([^"]*)">', page))
    assert (
        fields[b"state"] == state.encode() and fields[b"code_challenge"] == params["code_challenge"].encode()
    )
    form = {k.decode(): v.decode() for k, v in fields.items()} | {"username": user, "password": password}
    status, headers, _ = request(f"{oidc.url}/login", form)
    assert status == 302
    location = urlsplit(headers["Location"])
    assert f"{location.scheme}://{location.netloc}{location.path}" == CALLBACK
    query = {k: v[-1] for k, v in parse_qs(location.query).items()}
    assert query["state"] == state
    cookie = headers["Set-Cookie"].split(";")[0]
    return query["code"], cookie


def exchange(oidc: LocalOidc, code: str, verifier: str, **changes: str) -> tuple[int, dict, bytes]:
    form = {
        "grant_type": "authorization_code",
        "client_id": CLIENT,
        "code": code,
        "redirect_uri": CALLBACK,
        "code_verifier": verifier,
    } | changes
    return request(f"{oidc.url}/oauth2/token", form, {"Origin": "http://127.0.0.1:5173"})


def refresh(oidc: LocalOidc, refresh_token: str) -> tuple[int, dict]:
    form = {"grant_type": "refresh_token", "client_id": CLIENT, "refresh_token": refresh_token}
    status, _, body = request(f"{oidc.url}/oauth2/token", form)
    return status, json.loads(body)


def principal(token: str) -> str | None:
    event = {"type": "REQUEST", "methodArn": ARN, "queryStringParameters": {"token": token}, "headers": {}}
    result = authorizer.handler({**event, "requestContext": {"connectionId": "c1="}}, None)
    allowed = result["policyDocument"]["Statement"][0]["Effect"] == "Allow"
    return result["principalId"] if allowed else None


def new_verifier() -> str:
    return secrets.token_urlsafe(32)  # 43 characters, as the page makes them


def test_the_s256_challenge_is_rfc_7636s():
    # RFC 7636, appendix B.
    assert (
        s256("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk") == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    )
    assert (
        s256("x" * 43) == base64.urlsafe_b64encode(hashlib.sha256(b"x" * 43).digest()).rstrip(b"=").decode()
    )


def test_tokens_pass_the_authorizers_verification(oidc, pool):
    verifier = new_verifier()
    code, _ = log_in(oidc, verifier)
    status, headers, body = exchange(oidc, code, verifier)
    assert status == 200, body
    assert headers["Access-Control-Allow-Origin"] == "http://127.0.0.1:5173"
    tokens = json.loads(body)
    assert tokens["token_type"] == "Bearer" and tokens["expires_in"] == 120
    access, id_token = claims(tokens["access_token"]), claims(tokens["id_token"])
    issuer = f"https://cognito-idp.{REGION}.amazonaws.com/{POOL}"
    assert access["iss"] == id_token["iss"] == issuer
    assert access["token_use"] == "access" and access["client_id"] == CLIENT and access["username"] == "alice"
    assert access["scope"] == "openid email profile" and access["exp"] - access["iat"] == 120
    assert {"auth_time", "jti", "origin_jti", "sub"} <= access.keys()
    assert id_token["token_use"] == "id" and id_token["aud"] == CLIENT
    assert id_token["cognito:username"] == "alice" and id_token["email"] == "alice@example.com"
    assert id_token["sub"] == access["sub"] and id_token["origin_jti"] == access["origin_jti"]
    # Both are what the authorizer accepts, as `cognito:<sub>`; the refresh token is opaque.
    assert principal(tokens["access_token"]) == f"cognito:{access['sub']}"
    assert principal(tokens["id_token"]) == f"cognito:{access['sub']}"
    assert tokens["refresh_token"].count(".") == 0
    # A token the stand-in did not sign, or for another pool, is not.
    forged = tokens["access_token"].rsplit(".", 1)[0] + "." + tokens["id_token"].rsplit(".", 1)[1]
    assert principal(forged) is None


def test_a_wrong_verifier_is_refused(oidc):
    verifier = new_verifier()
    code, _ = log_in(oidc, verifier)
    status, _, body = exchange(oidc, code, new_verifier())
    assert status == 400 and json.loads(body)["error"] == "invalid_grant"
    # The code was used up by the failed attempt.
    status, _, body = exchange(oidc, code, verifier)
    assert status == 400 and json.loads(body)["error"] == "invalid_grant"


def test_a_code_cannot_be_used_twice_nor_by_another_redirect_uri(oidc):
    verifier = new_verifier()
    code, _ = log_in(oidc, verifier)
    assert exchange(oidc, code, verifier)[0] == 200
    status, _, body = exchange(oidc, code, verifier)
    assert status == 400 and json.loads(body)["error"] == "invalid_grant"
    code, _ = log_in(oidc, verifier)
    status, _, body = exchange(oidc, code, verifier, redirect_uri="http://127.0.0.1:5173/other")
    assert status == 400 and json.loads(body)["error"] == "invalid_grant"


def test_refresh_then_revoke(oidc, pool):
    verifier = new_verifier()
    code, _ = log_in(oidc, verifier, user="bob", password="builder")
    tokens = json.loads(exchange(oidc, code, verifier)[2])
    before = oidc.stats.as_json()
    status, renewed = refresh(oidc, tokens["refresh_token"])
    assert status == 200 and "refresh_token" not in renewed  # as Cognito without rotation
    assert claims(renewed["access_token"])["jti"] != claims(tokens["access_token"])["jti"]
    assert claims(renewed["access_token"])["origin_jti"] == claims(tokens["access_token"])["origin_jti"]
    assert principal(renewed["access_token"]) == f"cognito:{claims(tokens['access_token'])['sub']}"

    form = {"token": tokens["refresh_token"], "client_id": CLIENT}
    status, headers, _ = request(f"{oidc.url}/oauth2/revoke", form, {"Origin": "http://127.0.0.1:5173"})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == "http://127.0.0.1:5173"
    status, body = refresh(oidc, tokens["refresh_token"])
    assert status == 400 and body["error"] == "invalid_grant"

    stats = json.loads(request(f"{oidc.url}/_stats")[2])
    assert stats["grants"]["refresh_token"] == before["grants"]["refresh_token"] + 1
    assert stats["revocations"] == before["revocations"] + 1
    assert stats["refused_grants"] == before["refused_grants"] + 1
    issued = {t["jti"]: t["grant"] for t in stats["access_tokens"]}
    assert issued[claims(renewed["access_token"])["jti"]] == "refresh_token"
    assert issued[claims(tokens["access_token"])["jti"]] == "authorization_code"
    # Only refresh tokens can be revoked; another client cannot revoke this one.
    status, _, body = request(
        f"{oidc.url}/oauth2/revoke", {"token": tokens["access_token"], "client_id": CLIENT}
    )
    assert status == 400 and json.loads(body)["error"] == "unsupported_token_type"
    assert request(f"{oidc.url}/oauth2/revoke", {"token": "x", "client_id": "other"})[0] == 401


def test_unregistered_client_or_redirect_uri_gets_an_error_page_not_a_redirect(oidc):
    verifier = new_verifier()
    for changes in ({"client_id": "someone-else"}, {"redirect_uri": "https://evil.example/"}):
        status, headers, page = request(
            f"{oidc.url}/oauth2/authorize?{urlencode(authorize_params(verifier, **changes))}"
        )
        assert status == 400 and "Location" not in headers and b"error" in page.lower()
    # A registered redirect_uri gets OAuth's error there: no PKCE, or no code flow.
    for changes, error in (
        ({"code_challenge_method": "plain"}, "invalid_request"),
        ({"response_type": "token"}, "unsupported_response_type"),
    ):
        status, headers, _ = request(
            f"{oidc.url}/oauth2/authorize?{urlencode(authorize_params(verifier, **changes))}"
        )
        query = parse_qs(urlsplit(headers["Location"]).query)
        assert status == 302 and query["error"] == [error] and query["state"] == ["st-1"]


def test_a_wrong_password_shows_the_form_again(oidc):
    params = authorize_params(new_verifier())
    before = oidc.stats.refused_logins
    status, headers, page = request(f"{oidc.url}/login", params | {"username": "alice", "password": "nope"})
    assert status == 200 and "Location" not in headers
    assert b"Incorrect username or password." in page and b'name="password"' in page
    assert oidc.stats.refused_logins == before + 1


def test_the_session_cookie_skips_the_form_until_logout(oidc):
    verifier = new_verifier()
    _, cookie = log_in(oidc, verifier)
    url = f"{oidc.url}/oauth2/authorize?{urlencode(authorize_params(verifier, state='again'))}"
    status, headers, _ = request(url, headers={"Cookie": cookie})
    assert status == 302
    code = parse_qs(urlsplit(headers["Location"]).query)["code"][0]
    assert exchange(oidc, code, verifier)[0] == 200

    bad = urlencode({"client_id": CLIENT, "logout_uri": "https://evil.example/"})
    assert request(f"{oidc.url}/logout?{bad}", headers={"Cookie": cookie})[0] == 400
    logout = urlencode({"client_id": CLIENT, "logout_uri": CALLBACK})
    status, headers, _ = request(f"{oidc.url}/logout?{logout}", headers={"Cookie": cookie})
    assert status == 302 and headers["Location"] == CALLBACK and "Max-Age=0" in headers["Set-Cookie"]
    status, _, page = request(url, headers={"Cookie": cookie})
    assert status == 200 and b'name="password"' in page


def test_token_endpoint_errors_are_oauth_json_with_cors(oidc):
    status, headers, body = request(
        f"{oidc.url}/oauth2/token",
        {"grant_type": "password", "client_id": CLIENT},
        {"Origin": "http://x.test"},
    )
    assert status == 400 and json.loads(body)["error"] == "unsupported_grant_type"
    assert headers["Access-Control-Allow-Origin"] == "http://x.test"
    status, _, body = request(
        f"{oidc.url}/oauth2/token", {"grant_type": "refresh_token", "client_id": "nope"}
    )
    assert status == 401 and json.loads(body)["error"] == "invalid_client"
    preflight = urllib.request.Request(
        f"{oidc.url}/oauth2/token", method="OPTIONS", headers={"Origin": "http://x.test"}
    )
    with urllib.request.urlopen(preflight, timeout=10) as response:
        assert response.status == 204 and response.headers["Access-Control-Allow-Origin"] == "http://x.test"


def test_discovery_documents(oidc):
    config = json.loads(request(f"{oidc.url}/.well-known/openid-configuration")[2])
    assert config["issuer"] == f"https://cognito-idp.{REGION}.amazonaws.com/{POOL}"
    assert config["token_endpoint"] == f"{oidc.url}/oauth2/token"
    assert config["code_challenge_methods_supported"] == ["S256"]
    keys = json.loads(request(config["jwks_uri"])[2])["keys"]
    assert [(k["kty"], k["alg"], k["kid"]) for k in keys] == [("RSA", "RS256", oidc.kid)]
