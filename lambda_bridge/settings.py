"""The bridge's configuration (environment variables, read once per Lambda container) and its two secrets.

The users' token is what people present (the authorizer checks it). The bridge token is the bridge's
own credential towards the Serve ingress (`Authorization: Bearer` on `/bridge/*`): the users' token does
not open those routes, so holding it is not enough to speak for someone else or to open conversations
on the ingress directly.

| variable | meaning |
|---|---|
| `SERVE_URL` | the Serve ingress, e.g. `http://ray-head.csm.local:8000` (required) |
| `TOKEN_SECRET_ARN` | Secrets Manager secret holding the shared token (a string, or JSON with `token`) |
| `TOKEN_PARAMETER` | or an SSM SecureString parameter holding it |
| `TOKEN` | or the token itself (local development only) |
| `BRIDGE_TOKEN_SECRET_ARN` | Secrets Manager secret holding the bridge token (as for `TOKEN_SECRET_ARN`) |
| `BRIDGE_TOKEN_PARAMETER` | or an SSM SecureString parameter holding it |
| `BRIDGE_TOKEN` | or the bridge token itself (local development only) |
| `AUTH_MODE` | `handler` (default: `$connect` checks `?token=`) or `authorizer` (the authorizer did) |
| `CALLBACK_URL` | the `@connections` endpoint; default `https://{domainName}/{stage}` from the event |
| `FORWARD_DEADLINE_S` | the most one forward may take, retries included (default 20; capped below 29 s) |
| `COGNITO_USER_POOL_ID`, `COGNITO_REGION` | the authorizer also accepts this pool's Cognito JWTs |
| `COGNITO_CLIENT_ID` | the app client(s) whose tokens it accepts, comma-separated (required with a pool) |
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass

# API Gateway gives up on an integration after 29 s; a forward must end (and report) before that.
INTEGRATION_LIMIT_S = 29.0
_DEADLINE_MARGIN_S = 2.0


@dataclass(frozen=True)
class Settings:
    serve_url: str
    auth_mode: str = "handler"
    callback_url: str | None = None
    forward_deadline_s: float = 20.0
    token_secret_arn: str | None = None
    token_parameter: str | None = None
    token: str | None = None
    bridge_token_secret_arn: str | None = None
    bridge_token_parameter: str | None = None
    bridge_token: str | None = None
    cognito_user_pool_id: str | None = None
    cognito_client_ids: tuple[str, ...] = ()
    cognito_region: str | None = None

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        serve_url = env.get("SERVE_URL", "").rstrip("/")
        if not serve_url.startswith(("http://", "https://")):
            raise ValueError(f"SERVE_URL must be an http(s) URL, got {serve_url!r}")
        auth_mode = env.get("AUTH_MODE", "handler")
        if auth_mode not in ("handler", "authorizer"):
            raise ValueError(f"AUTH_MODE must be 'handler' or 'authorizer', got {auth_mode!r}")
        deadline = float(env.get("FORWARD_DEADLINE_S", "20"))
        if not 0 < deadline <= INTEGRATION_LIMIT_S - _DEADLINE_MARGIN_S:
            raise ValueError(
                f"FORWARD_DEADLINE_S must be in (0, {INTEGRATION_LIMIT_S - _DEADLINE_MARGIN_S:g}]"
            )
        pool_id, clients = env.get("COGNITO_USER_POOL_ID") or None, env.get("COGNITO_CLIENT_ID", "")
        client_ids = tuple(part.strip() for part in clients.split(",") if part.strip())
        if pool_id and not client_ids:
            # Fail closed: without it a token from any app client of the pool (another app's) would do.
            raise ValueError("COGNITO_CLIENT_ID must name the app client(s) to accept from the pool")
        return cls(
            serve_url=serve_url,
            auth_mode=auth_mode,
            callback_url=env.get("CALLBACK_URL") or None,
            forward_deadline_s=deadline,
            token_secret_arn=env.get("TOKEN_SECRET_ARN") or None,
            token_parameter=env.get("TOKEN_PARAMETER") or None,
            token=env.get("TOKEN") or None,
            bridge_token_secret_arn=env.get("BRIDGE_TOKEN_SECRET_ARN") or None,
            bridge_token_parameter=env.get("BRIDGE_TOKEN_PARAMETER") or None,
            bridge_token=env.get("BRIDGE_TOKEN") or None,
            cognito_user_pool_id=pool_id,
            cognito_client_ids=client_ids,
            cognito_region=env.get("COGNITO_REGION") or env.get("AWS_REGION") or None,
        )

    def callback_for(self, request_context: dict) -> str:
        """Where `@connections` lives for this API (a custom domain needs `CALLBACK_URL`)."""
        if self.callback_url:
            return self.callback_url.rstrip("/")
        return f"https://{request_context['domainName']}/{request_context['stage']}"


@functools.cache
def settings() -> Settings:
    """Read once per container, as Lambda reuses it; tests call `reset()` after changing the environment."""
    return Settings.from_env()


@functools.cache
def shared_token() -> str | None:
    """The users' shared token, fetched once per container: Secrets Manager, else SSM, else `TOKEN`.

    None means no token is configured: then nothing is checked (local development only).
    """
    s = settings()
    return _secret(s.token_secret_arn, s.token_parameter, s.token)


@functools.cache
def bridge_token() -> str | None:
    """The bridge's own token for the ingress, fetched once per container, as `shared_token` is.

    None: the bridge presents nothing, and an ingress refuses it (its bridge routes need a token).
    """
    s = settings()
    return _secret(s.bridge_token_secret_arn, s.bridge_token_parameter, s.bridge_token)


def _secret(secret_arn: str | None, parameter: str | None, value: str | None) -> str | None:
    if secret_arn:
        import boto3

        text = boto3.client("secretsmanager").get_secret_value(SecretId=secret_arn)["SecretString"]
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            return text
        return parsed["token"] if isinstance(parsed, dict) else text
    if parameter:
        import boto3

        response = boto3.client("ssm").get_parameter(Name=parameter, WithDecryption=True)
        return response["Parameter"]["Value"]
    return value


def reset() -> None:
    """Forget the cached settings and secrets (tests; a real container never changes its environment)."""
    settings.cache_clear()
    shared_token.cache_clear()
    bridge_token.cache_clear()
