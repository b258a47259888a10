"""The ingress's settings (`IngressConfig`, the app's `ingress` args) and who may connect (`access`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field

from serve_app import protocol as p
from serve_app.conversation import Limits
from serve_app.speech_api import SpeechConfig
from serve_app.voices import NO_VOICE

log = logging.getLogger(__name__)


class IngressConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    history_dir: str | None = None  # default: $HISTORY_DIR, else ./history
    voices_dir: str | None = None  # default: $VOICES_DIR
    default_voice: str = NO_VOICE
    token: str | None = None  # default: $CSM_TOKEN; its holder's principal is "token"
    # Named tokens, one principal each ("token:<name>"): default $CSM_TOKENS, "name=token,name=token".
    tokens: dict[str, str] = Field(default_factory=dict)
    # No token at all lets everyone in as "anonymous", and only when asked for (default
    # $CSM_ALLOW_ANONYMOUS=1; `make demo` sets it and says so): silence is never an open door.
    allow_anonymous: bool | None = None
    frontend_dir: str | None = None  # default: frontend/dist of the checkout
    max_conversations: int = Field(16, ge=1)
    # Open conversations one token may hold, across every ingress replica (serve_app.principals); the
    # bridge passes its authorizer's principal instead (a Cognito user, say). Off by default: the demo's
    # one shared token is everyone's.
    max_conversations_per_token: int | None = Field(None, ge=1)
    # The Lambda bridge's own token (`Authorization: Bearer` on /bridge/*; the users' token never opens
    # them), default $CSM_BRIDGE_TOKEN; and where bridged replies go, the API's `@connections` endpoint,
    # default $CSM_BRIDGE_CALLBACK_URL. Without both the bridge routes are off (403).
    bridge_token: str | None = None
    bridge_callback_url: str | None = None
    max_message_bytes: int = Field(p.DEFAULT_MAX_MESSAGE_BYTES, ge=1024)
    max_audio_ms_per_message: int = Field(1000, ge=20)
    events_per_second: float = Field(50.0, gt=0)  # sustained, per conversation
    event_burst: int = Field(100, ge=1)
    idle_timeout_s: float = Field(600.0, gt=0)  # API Gateway's idle limit is 10 minutes too
    # Recognize each turn while it is spoken (`SpeechRecognizer.push`); off: once the turn has ended.
    streaming_asr: bool = True
    limits: Limits = Field(default_factory=Limits)
    history_retention_days: float | None = Field(30.0, gt=0)  # None: kept forever
    max_history_mb: float = Field(64.0, gt=0)  # one conversation's file; compacted to its last turns
    speech: SpeechConfig = Field(default_factory=SpeechConfig)  # /v1/audio/speech (serve_app.speech_api)


def access(cfg: IngressConfig, env: Mapping[str, str]) -> tuple[dict[str, str], bool]:
    """Who may connect: (name → token, whether anyone may, as "anonymous"), from the config, else the
    environment (`CSM_TOKEN`, `CSM_TOKENS`, `CSM_ALLOW_ANONYMOUS`). No token and no opt-in is an error."""
    tokens = _named_tokens(cfg.tokens or env.get("CSM_TOKENS", ""))
    token = cfg.token or env.get("CSM_TOKEN") or None
    if token is not None:
        tokens.setdefault("token", token)
    anonymous = env.get("CSM_ALLOW_ANONYMOUS") == "1" if cfg.allow_anonymous is None else cfg.allow_anonymous
    if not tokens and not anonymous:
        raise ValueError(
            "no token configured (CSM_TOKEN, CSM_TOKENS or ingress.token/tokens): set one, or let "
            "everyone in on purpose with CSM_ALLOW_ANONYMOUS=1 (ingress.allow_anonymous)"
        )
    if not tokens:
        log.warning("no token configured: every client is let in as 'anonymous' (CSM_ALLOW_ANONYMOUS=1)")
    return tokens, anonymous and not tokens


def _named_tokens(tokens: dict[str, str] | str) -> dict[str, str]:
    """name → token, from the config's dict or `CSM_TOKENS` ("alice=s3cret,bob=0ther")."""
    if isinstance(tokens, dict):
        pairs = list(tokens.items())
    else:
        pairs = [tuple(part.split("=", 1)) for part in tokens.split(",") if part.strip()]
    out: dict[str, str] = {}
    for pair in pairs:
        if len(pair) != 2 or not pair[0].strip() or not pair[1].strip():
            raise ValueError("CSM_TOKENS must be name=token pairs, separated by commas")
        out[pair[0].strip()] = pair[1].strip()
    return out
