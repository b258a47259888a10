"""A local stand-in for a Cognito user pool's hosted UI and OAuth 2.0 endpoints, for the page's sign-in.

    python -m devtools.local_oidc --port 9229 --region eu-west-1 --pool-id eu-west-1_local \
        --client-id local-client --callback-url http://127.0.0.1:8000/ --user alice:wonderland

Point the page's config.json at it (`"auth": {"domain": "http://127.0.0.1:9229", "clientId":
"local-client", "scopes": ["openid", "email", "profile"]}`) and the authorizer at its keys
(`COGNITO_USER_POOL_ID=eu-west-1_local COGNITO_REGION=eu-west-1 COGNITO_CLIENT_ID=local-client
COGNITO_JWKS_URL=http://127.0.0.1:9229/.well-known/jwks.json`). Like Cognito, it:
- signs id and access tokens RS256 (with a key it generates at start, published as a JWKS) under the
  issuer `https://cognito-idp.{region}.amazonaws.com/{pool id}`, with Cognito's claims; refresh tokens
  are opaque and stay valid until revoked;
- `GET /oauth2/authorize` shows a login form (or, with a session cookie from an earlier login, redirects
  at once); an unknown `client_id` or a `redirect_uri` that is not a callback URL gets an error page, not
  a redirect; `POST /login` checks the password and redirects to `redirect_uri` with `code` and `state`;
- `POST /oauth2/token`: `authorization_code` (a single-use code, five minutes; the same client and
  redirect_uri; the PKCE S256 verifier) and `refresh_token`; errors as OAuth JSON (`invalid_grant`, ...),
  with CORS headers for pages on other origins;
- `POST /oauth2/revoke` (a revoked refresh token is refused from then on), `GET /logout` (ends the
  session, redirects to a registered `logout_uri`), `GET /.well-known/jwks.json` and
  `GET /.well-known/openid-configuration`.

Unlike Cognito it requires PKCE (S256) on every authorization, keeps everything in memory, and counts
what it did at `GET /_stats` (grants, revocations, logins, and each access token's jti) for tests.
A revoked refresh token does not revoke the JWTs already issued from it (nor does Cognito for anyone who
checks them offline, as the authorizer does). It is a development and test tool and is never deployed.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import html
import json
import logging
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

log = logging.getLogger("local_oidc")

SESSION_COOKIE = "local_oidc_session"
CODE_LIFETIME_S = 300  # Cognito's authorization codes last five minutes
ID_TOKEN_SECONDS = 3600


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def s256(verifier: str) -> str:
    """The PKCE S256 code challenge for `verifier` (RFC 7636, section 4.2)."""
    return b64url(hashlib.sha256(verifier.encode("ascii")).digest())


class OAuthError(Exception):
    """An OAuth error response: `error` as RFC 6749 names it, and a description for people."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.error, self.description, self.status = error, description, status


@dataclass
class _Code:
    client_id: str
    redirect_uri: str
    challenge: str
    scope: str
    username: str
    auth_time: int
    expires: float


@dataclass
class _Refresh:
    client_id: str
    scope: str
    username: str
    auth_time: int
    origin_jti: str
    revoked: bool = False


@dataclass
class Stats:
    """What the stand-in did, for tests (`GET /_stats`)."""

    logins: int = 0
    refused_logins: int = 0
    authorization_code: int = 0
    refresh_token: int = 0
    refused_grants: int = 0
    revocations: int = 0
    logouts: int = 0
    access_tokens: list[dict] = field(default_factory=list)  # {"jti", "grant", "username"} in order

    def as_json(self) -> dict:
        return {
            "logins": self.logins,
            "refused_logins": self.refused_logins,
            "grants": {"authorization_code": self.authorization_code, "refresh_token": self.refresh_token},
            "refused_grants": self.refused_grants,
            "revocations": self.revocations,
            "logouts": self.logouts,
            "access_tokens": list(self.access_tokens),
        }


class LocalOidc:
    """The user pool, its one app client and its hosted UI on loopback; see the module docstring."""

    def __init__(
        self,
        *,
        users: dict[str, str],
        client_id: str,
        callback_urls: list[str],
        logout_urls: list[str] | None = None,
        region: str = "us-east-1",
        pool_id: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        access_token_seconds: int = 3600,
    ) -> None:
        if access_token_seconds <= 0:
            raise ValueError("access_token_seconds must be positive")
        self.users = dict(users)
        self.client_id = client_id
        self.callback_urls = list(callback_urls)
        self.logout_urls = list(logout_urls if logout_urls is not None else callback_urls)
        self.region = region
        self.pool_id = pool_id or f"{region}_local"
        self.issuer = f"https://cognito-idp.{region}.amazonaws.com/{self.pool_id}"
        self.access_token_seconds = access_token_seconds
        self.kid = secrets.token_hex(8)
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.stats = Stats()
        self._codes: dict[str, _Code] = {}
        self._refresh: dict[str, _Refresh] = {}
        self._sessions: dict[str, tuple[str, int]] = {}  # cookie value → (username, auth_time)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((host, port), _handler_for(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # ---- lifecycle --------------------------------------------------------------------------------
    def start(self) -> LocalOidc:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> LocalOidc:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def serve_forever(self) -> None:
        self._server.serve_forever()

    # ---- documents --------------------------------------------------------------------------------
    def jwks(self) -> dict:
        numbers = self._key.public_key().public_numbers()
        as_b64 = lambda n: b64url(n.to_bytes((n.bit_length() + 7) // 8, "big"))  # noqa: E731
        key = {"kty": "RSA", "kid": self.kid, "alg": "RS256", "use": "sig"}
        return {"keys": [{**key, "n": as_b64(numbers.n), "e": as_b64(numbers.e)}]}

    def openid_configuration(self) -> dict:
        base = self.url
        return {
            "issuer": self.issuer,
            "authorization_endpoint": f"{base}/oauth2/authorize",
            "token_endpoint": f"{base}/oauth2/token",
            "revocation_endpoint": f"{base}/oauth2/revoke",
            "end_session_endpoint": f"{base}/logout",
            "jwks_uri": f"{base}/.well-known/jwks.json",
            "response_types_supported": ["code"],
            "grant_types_supported": ["authorization_code", "refresh_token"],
            "code_challenge_methods_supported": ["S256"],
            "scopes_supported": ["openid", "email", "phone", "profile"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "token_endpoint_auth_methods_supported": ["none"],
        }

    # ---- the hosted UI ----------------------------------------------------------------------------
    def check_authorize(self, params: dict[str, str]) -> str | None:
        """Why the request may not be redirected back at all (an error page), or None."""
        if params.get("client_id") != self.client_id:
            return "The client_id is not an app client of this user pool."
        if params.get("redirect_uri") not in self.callback_urls:
            return "The redirect_uri is not one of the app client's callback URLs."
        return None

    def authorize_error(self, params: dict[str, str]) -> str | None:
        """Why the authorization is refused back at the redirect_uri (`error=`), or None."""
        if params.get("response_type") != "code":
            return "unsupported_response_type"
        if not params.get("code_challenge") or params.get("code_challenge_method") != "S256":
            return "invalid_request"  # this stand-in requires PKCE with S256
        if not set(params.get("scope", "openid").split()) <= {"openid", "email", "phone", "profile"}:
            return "invalid_scope"
        return None

    def login(self, username: str, password: str) -> tuple[str, int] | None:
        """A new session (its cookie value and auth_time), or None for a wrong username or password."""
        expected = self.users.get(username)
        with self._lock:
            if expected is None or not secrets.compare_digest(expected.encode(), password.encode()):
                self.stats.refused_logins += 1
                return None
            self.stats.logins += 1
            session, auth_time = secrets.token_urlsafe(24), int(time.time())
            self._sessions[session] = (username, auth_time)
            return session, auth_time

    def session_user(self, cookie: str | None) -> tuple[str, int] | None:
        with self._lock:
            return self._sessions.get(cookie or "")

    def logout(self, cookie: str | None) -> None:
        with self._lock:
            self._sessions.pop(cookie or "", None)
            self.stats.logouts += 1

    def issue_code(self, params: dict[str, str], username: str, auth_time: int) -> str:
        code = str(uuid.uuid4())  # Cognito's codes are UUIDs
        with self._lock:
            self._codes[code] = _Code(
                client_id=params["client_id"],
                redirect_uri=params["redirect_uri"],
                challenge=params["code_challenge"],
                scope=params.get("scope") or "openid",
                username=username,
                auth_time=auth_time,
                expires=time.time() + CODE_LIFETIME_S,
            )
        return code

    # ---- the token endpoint -----------------------------------------------------------------------
    def token(self, form: dict[str, str]) -> dict:
        try:
            if form.get("client_id") != self.client_id:
                raise OAuthError("invalid_client", "unknown client_id", 401)
            grant = form.get("grant_type")
            if grant == "authorization_code":
                return self._code_grant(form)
            if grant == "refresh_token":
                return self._refresh_grant(form)
            raise OAuthError("unsupported_grant_type", f"grant_type {grant!r} is not supported")
        except OAuthError:
            with self._lock:
                self.stats.refused_grants += 1
            raise

    def _code_grant(self, form: dict[str, str]) -> dict:
        with self._lock:
            # Single use: taken out whether or not the rest checks out.
            code = self._codes.pop(form.get("code", ""), None)
        if code is None or code.expires < time.time():
            raise OAuthError("invalid_grant", "the code is unknown, expired or already used")
        if code.client_id != form["client_id"] or code.redirect_uri != form.get("redirect_uri"):
            raise OAuthError("invalid_grant", "the code was issued to another client or redirect_uri")
        verifier = form.get("code_verifier", "")
        if not 43 <= len(verifier) <= 128 or not secrets.compare_digest(s256(verifier), code.challenge):
            raise OAuthError("invalid_grant", "the code_verifier does not match the code_challenge")
        refresh_token = secrets.token_urlsafe(48)
        origin_jti = str(uuid.uuid4())
        with self._lock:
            self._refresh[refresh_token] = _Refresh(
                code.client_id, code.scope, code.username, code.auth_time, origin_jti
            )
            self.stats.authorization_code += 1
        tokens = self._tokens("authorization_code", code.username, code.scope, code.auth_time, origin_jti)
        return {**tokens, "refresh_token": refresh_token}

    def _refresh_grant(self, form: dict[str, str]) -> dict:
        with self._lock:
            grant = self._refresh.get(form.get("refresh_token", ""))
        if grant is None or grant.revoked or grant.client_id != form["client_id"]:
            raise OAuthError("invalid_grant", "Refresh Token has been revoked")
        with self._lock:
            self.stats.refresh_token += 1
        # As Cognito without refresh-token rotation: new id and access tokens, the same refresh token.
        return self._tokens("refresh_token", grant.username, grant.scope, grant.auth_time, grant.origin_jti)

    def revoke(self, form: dict[str, str]) -> None:
        if form.get("client_id") != self.client_id:
            raise OAuthError("invalid_client", "unknown client_id", 401)
        token = form.get("token", "")
        if not token:
            raise OAuthError("invalid_request", "token is required")
        if token.count(".") == 2:
            raise OAuthError("unsupported_token_type", "only refresh tokens can be revoked")
        with self._lock:
            grant = self._refresh.get(token)
            if grant is not None and grant.client_id == form["client_id"]:
                grant.revoked = True
            self.stats.revocations += 1  # an unknown token is "revoked" too (RFC 7009, section 2.2)

    def _tokens(self, grant: str, username: str, scope: str, auth_time: int, origin_jti: str) -> dict:
        now = int(time.time())
        sub = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{self.issuer}/{username}"))
        event_id = str(uuid.uuid4())
        access_jti = str(uuid.uuid4())
        access = {
            "sub": sub,
            "iss": self.issuer,
            "client_id": self.client_id,
            "origin_jti": origin_jti,
            "event_id": event_id,
            "token_use": "access",
            "scope": scope,
            "auth_time": auth_time,
            "exp": now + self.access_token_seconds,
            "iat": now,
            "jti": access_jti,
            "username": username,
            "version": 2,
        }
        result = {
            "access_token": self._sign(access),
            "expires_in": self.access_token_seconds,
            "token_type": "Bearer",
        }
        if "openid" in scope.split():
            email = username if "@" in username else f"{username}@example.com"
            result["id_token"] = self._sign(
                {
                    "sub": sub,
                    "aud": self.client_id,
                    "email_verified": True,
                    "event_id": event_id,
                    "token_use": "id",
                    "auth_time": auth_time,
                    "iss": self.issuer,
                    "cognito:username": username,
                    "exp": now + ID_TOKEN_SECONDS,
                    "iat": now,
                    "jti": str(uuid.uuid4()),
                    "origin_jti": origin_jti,
                    "email": email,
                }
            )
        with self._lock:
            self.stats.access_tokens.append({"jti": access_jti, "grant": grant, "username": username})
        return result

    def _sign(self, claims: dict) -> str:
        head = b64url(json.dumps({"kid": self.kid, "alg": "RS256"}).encode())
        body = b64url(json.dumps(claims).encode())
        signature = self._key.sign(f"{head}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{head}.{body}.{b64url(signature)}"


# ---- HTTP ------------------------------------------------------------------------------------------

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font:16px system-ui,sans-serif;max-width:22rem;margin:4rem auto}}
label,input,button{{display:block;width:100%;margin:.3rem 0}}
input,button{{padding:.5rem;box-sizing:border-box}}.error{{color:#b00020}}</style>
</head><body><h1>{title}</h1>{body}</body></html>"""

_AUTHORIZE_FIELDS = (
    "response_type",
    "client_id",
    "redirect_uri",
    "scope",
    "state",
    "code_challenge",
    "code_challenge_method",
)


def _page(title: str, body: str) -> bytes:
    return _PAGE.format(title=html.escape(title), body=body).encode()


def _login_form(params: dict[str, str], error: str | None = None) -> bytes:
    hidden = "".join(
        f'<input type="hidden" name="{name}" value="{html.escape(params[name])}">'
        for name in _AUTHORIZE_FIELDS
        if name in params
    )
    problem = f'<p class="error" role="alert">{html.escape(error)}</p>' if error else ""
    return _page(
        "Sign in",
        f'{problem}<form method="post" action="/login">{hidden}'
        '<label for="username">Username</label>'
        '<input id="username" name="username" autocomplete="username" required>'
        '<label for="password">Password</label>'
        '<input id="password" name="password" type="password" autocomplete="current-password" required>'
        '<button type="submit">Sign in</button></form>',
    )


def _with_query(url: str, params: dict[str, str]) -> str:
    parts = urlsplit(url)
    query = "&".join(q for q in (parts.query, urlencode(params)) if q)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


def _handler_for(oidc: LocalOidc) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "local_oidc"

        # ---- plumbing ----
        def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, value: object, cors: bool = False) -> None:
            self._send(status, json.dumps(value).encode(), "application/json", self._cors() if cors else None)

        def _html(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self._send(status, body, "text/html; charset=utf-8", headers)

        def _redirect(self, location: str, headers: dict[str, str] | None = None) -> None:
            self._send(HTTPStatus.FOUND, b"", "text/plain", {"Location": location, **(headers or {})})

        def _cors(self) -> dict[str, str]:
            # Any origin: a page may call the token and revoke endpoints from wherever it is served.
            return {
                "Access-Control-Allow-Origin": self.headers.get("Origin") or "*",
                "Access-Control-Allow-Methods": "POST, OPTIONS",
                "Access-Control-Allow-Headers": "Content-Type, Authorization",
                "Access-Control-Max-Age": "600",
                "Vary": "Origin",
            }

        def _query(self) -> dict[str, str]:
            return {k: v[-1] for k, v in parse_qs(urlsplit(self.path).query).items()}

        def _form(self) -> dict[str, str] | None:
            """The urlencoded body, or None for another content type."""
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.headers.get_content_type() != "application/x-www-form-urlencoded":
                return None
            return {k: v[-1] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}

        def _cookie(self) -> str | None:
            jar = SimpleCookie()
            try:
                jar.load(self.headers.get("Cookie", ""))
            except Exception:  # http.cookies raises its own CookieError, and more, on junk
                return None
            morsel = jar.get(SESSION_COOKIE)
            return morsel.value if morsel else None

        def log_message(self, fmt: str, *args) -> None:
            log.info("%s %s", self.address_string(), fmt % args)

        # ---- routes ----
        def do_OPTIONS(self) -> None:
            if urlsplit(self.path).path in ("/oauth2/token", "/oauth2/revoke"):
                self._send(HTTPStatus.NO_CONTENT, b"", "text/plain", self._cors())
            else:
                self._send(HTTPStatus.NOT_FOUND, b"", "text/plain")

        def do_GET(self) -> None:
            path = urlsplit(self.path).path
            if path == "/oauth2/authorize":
                self._authorize(self._query())
            elif path == "/logout":
                self._logout(self._query())
            elif path == "/.well-known/jwks.json":
                self._json(HTTPStatus.OK, oidc.jwks())
            elif path == "/.well-known/openid-configuration":
                self._json(HTTPStatus.OK, oidc.openid_configuration())
            elif path == "/_stats":
                with oidc._lock:
                    self._json(HTTPStatus.OK, oidc.stats.as_json())
            else:
                self._html(HTTPStatus.NOT_FOUND, _page("Not found", "<p>No such page.</p>"))

        do_HEAD = do_GET

        def do_POST(self) -> None:
            path = urlsplit(self.path).path
            form = self._form()
            if path == "/login":
                self._login(form or {})
            elif path in ("/oauth2/token", "/oauth2/revoke"):
                if form is None:
                    error = OAuthError(
                        "invalid_request", "use Content-Type application/x-www-form-urlencoded"
                    )
                    self._json(
                        error.status, {"error": error.error, "error_description": error.description}, True
                    )
                    return
                try:
                    if path == "/oauth2/token":
                        self._json(HTTPStatus.OK, oidc.token(form), cors=True)
                    else:
                        oidc.revoke(form)
                        self._send(HTTPStatus.OK, b"", "text/plain", self._cors())
                except OAuthError as e:
                    self._json(e.status, {"error": e.error, "error_description": e.description}, cors=True)
            else:
                self._html(HTTPStatus.NOT_FOUND, _page("Not found", "<p>No such page.</p>"))

        def _refused(self, params: dict[str, str]) -> bool:
            """Answer an authorize request that cannot go on (Cognito's error page for a bad client or
            redirect URI, an error back to the client for the rest); True when it was answered."""
            problem = oidc.check_authorize(params)
            if problem is not None:
                self._html(HTTPStatus.BAD_REQUEST, _page("An error was encountered", f"<p>{problem}</p>"))
                return True
            error = oidc.authorize_error(params)
            if error is not None:
                self._redirect(_with_query(params["redirect_uri"], self._back(params, error=error)))
                return True
            return False

        def _authorize(self, params: dict[str, str]) -> None:
            if self._refused(params):
                return
            session = oidc.session_user(self._cookie())
            if session is not None:  # signed in before: straight back, as Cognito's session cookie does
                code = oidc.issue_code(params, *session)
                self._redirect(_with_query(params["redirect_uri"], self._back(params, code=code)))
                return
            self._html(HTTPStatus.OK, _login_form(params))

        def _login(self, form: dict[str, str]) -> None:
            params = {name: form[name] for name in _AUTHORIZE_FIELDS if name in form}
            if self._refused(params):
                return
            username = form.get("username", "")
            session = oidc.login(username, form.get("password", ""))
            if session is None:
                self._html(HTTPStatus.OK, _login_form(params, "Incorrect username or password."))
                return
            code = oidc.issue_code(params, username, session[1])
            cookie = f"{SESSION_COOKIE}={session[0]}; Path=/; HttpOnly; SameSite=Lax"
            self._redirect(
                _with_query(params["redirect_uri"], self._back(params, code=code)), {"Set-Cookie": cookie}
            )

        def _back(self, params: dict[str, str], **values: str) -> dict[str, str]:
            return {**values, **({"state": params["state"]} if "state" in params else {})}

        def _logout(self, params: dict[str, str]) -> None:
            if params.get("client_id") != oidc.client_id:
                self._html(
                    HTTPStatus.BAD_REQUEST, _page("An error was encountered", "<p>Unknown client_id.</p>")
                )
                return
            if params.get("logout_uri") not in oidc.logout_urls:
                problem = "<p>The logout_uri is not one of the app client's sign-out URLs.</p>"
                self._html(HTTPStatus.BAD_REQUEST, _page("An error was encountered", problem))
                return
            oidc.logout(self._cookie())
            expired = f"{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0"
            self._redirect(params["logout_uri"], {"Set-Cookie": expired})

    return Handler


def _user(value: str) -> tuple[str, str]:
    name, sep, password = value.partition(":")
    if not sep or not name or not password:
        raise argparse.ArgumentTypeError(f"expected NAME:PASSWORD, got {value!r}")
    return name, password


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9229)
    parser.add_argument("--region", default="us-east-1", help="the pool's region (in the issuer)")
    parser.add_argument("--pool-id", help="the user pool id (default REGION_local)")
    parser.add_argument("--client-id", default="local-client", help="the app client id")
    parser.add_argument(
        "--callback-url",
        action="append",
        required=True,
        help="an allowed redirect_uri, e.g. http://127.0.0.1:8000/ (repeat for more)",
    )
    parser.add_argument(
        "--logout-url", action="append", help="an allowed logout_uri (default: the callback URLs)"
    )
    parser.add_argument(
        "--user", action="append", type=_user, required=True, help="NAME:PASSWORD (repeat for more)"
    )
    parser.add_argument("--access-token-seconds", type=int, default=3600, help="access tokens' lifetime")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    oidc = LocalOidc(
        users=dict(args.user),
        client_id=args.client_id,
        callback_urls=args.callback_url,
        logout_urls=args.logout_url,
        region=args.region,
        pool_id=args.pool_id,
        host=args.host,
        port=args.port,
        access_token_seconds=args.access_token_seconds,
    )
    print(f"ready: {oidc.url} (issuer {oidc.issuer}, client {oidc.client_id})", flush=True)
    try:
        oidc.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        oidc.stop()  # serve_forever has returned: this only closes the socket


if __name__ == "__main__":
    main()
