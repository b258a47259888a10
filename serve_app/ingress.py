"""`ConversationIngress`: the HTTP and WebSocket front of the app (FastAPI inside a Serve deployment).

Routes: `/` (the built page, or a placeholder until one is built), `/healthz`, `/readyz` (which weights
run, and "random weights" loudly), `/v1/voices`, `/v1/models`, `/v1/audio/speech` (OpenAI's speech API,
`serve_app.speech_api`), `/v1/realtime` (the realtime WebSocket), and
`/bridge/connections/{id}` (the Lambda bridge's path). A socket's life: token check → admission (a
bounded number of conversations) → accept → a receive loop and an emit loop → cleanup in `finally`.
Only the emit loop writes to the socket.
"""

# No `from __future__ import annotations` here: FastAPI reads the route methods' annotations at runtime
# (a string `WebSocket` annotation would make the socket a query parameter and refuse every connection).

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import metrics
from ray.serve.handle import DeploymentHandle

from csm.requests import PromptUse
from deployments.weights import RANDOM_WARNING, set_torch_threads
from serve_app import protocol as p
from serve_app.bridge import ApiGatewaySink, BridgeAccess, BridgeRefused, EventSink, bearer_token
from serve_app.conversation import Conversation, Limits, Observer, Shared
from serve_app.history import (
    LEASE_S,
    ConversationNotFound,
    HistoryStore,
    check_conversation_id,
)
from serve_app.services import Handles, RayServices
from serve_app.speech_api import SpeechApi, SpeechConfig, over_limit, server_busy, unauthorized
from serve_app.voices import NO_VOICE, VoiceLibrary
from speech.vad import load_vad_model

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]


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
    # Open conversations one token may hold (per ingress replica); the bridge passes its authorizer's
    # principal instead (a Cognito user, say). Off by default: the demo's one shared token is everyone's.
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


class _RateLimit:
    """Token bucket: `events_per_second` sustained, `burst` at once."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.at = float(burst), time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class _Session:
    """A conversation plus its connection: the outbound queue and the inbound checks."""

    def __init__(
        self, conversation: Conversation, outbox: asyncio.Queue[p.ServerEvent | None], cfg: IngressConfig
    ):
        self.conversation = conversation
        self.outbox = outbox
        self.rate = _RateLimit(cfg.events_per_second, cfg.event_burst)
        self.cfg = cfg
        self.close_code, self.close_reason = 1000, ""

    def take_over(self) -> None:
        """A newer connection has the conversation: say so, then the emit loop closes this socket."""
        if self.close_code == CLOSE_TAKEN_OVER:
            return
        self.close_code, self.close_reason = CLOSE_TAKEN_OVER, "taken over"
        self.outbox.put_nowait(p.error_event("conversation_taken_over", TAKEN_OVER))
        self.outbox.put_nowait(None)

    async def receive(self, raw: str | bytes) -> None:
        if not self.rate.allow():
            self.conversation.report(
                p.ProtocolError(
                    "rate_limited", f"over {self.cfg.events_per_second:g} events per second; event dropped"
                )
            )
            return
        try:
            event = p.parse_client_event(
                raw, self.cfg.max_message_bytes, max_audio_bytes=self.cfg.max_audio_ms_per_message * 48
            )
        except p.ProtocolError as e:
            self.conversation.report(e)
            return
        await self.conversation.handle(event)


CLOSE_TAKEN_OVER = 4001  # the page does not reconnect after it (it would take the conversation back)
NOT_FOUND = "no conversation with that id is yours to resume; connect without conversation_id for a new one"
TAKEN_OVER = "this conversation was opened on another connection, which now has it"


class _Lease:
    """A conversation held by one connection. Every LEASE_S / 3 it checks that it still holds it; once a
    newer connection took it over (here or on another replica), `lost` runs, which closes this one."""

    def __init__(self, store: HistoryStore, conversation_id: str, holder: str, history: list) -> None:
        self.store, self.conversation_id, self.holder, self.history = store, conversation_id, holder, history
        self.lost: Callable[[], None] = lambda: None
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> "_Lease":
        self._task = asyncio.get_running_loop().create_task(self._watch())
        return self

    async def __aexit__(self, *exc) -> None:
        if self._task is not None:
            self._task.cancel()
        await self.store.release(self.conversation_id, self.holder)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(LEASE_S / 3)
            try:
                held = await self.store.holds(self.conversation_id, self.holder)
            except OSError:
                log.warning("conversation lease check failed", exc_info=True)
                continue
            if not held:
                self.lost()
                return


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


def _presented(query_token: str | None, authorization: str | None) -> str | None:
    """The token a client presented: `?token=` (browsers cannot set headers), else `Authorization: Bearer`."""
    return query_token if query_token is not None else bearer_token(authorization)


_PLACEHOLDER = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>CSM voice</title></head>
<body style="font-family: system-ui, sans-serif; max-width: 40rem; margin: 3rem auto">
<h1>CSM voice conversations</h1>
<p>The server is running. The page is not built yet: the realtime API is at
<code>/v1/realtime</code> (WebSocket), voices at <a href="/v1/voices">/v1/voices</a>,
status at <a href="/readyz">/readyz</a>.</p>
</body></html>
"""


app = FastAPI(title="CSM voice conversations", docs_url=None, redoc_url=None)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress(app)
class ConversationIngress:
    def __init__(
        self,
        generator: DeploymentHandle,
        decoder: DeploymentHandle,
        tokenizer: DeploymentHandle,
        recognizer: DeploymentHandle,
        responder: DeploymentHandle,
        config: dict | None = None,
    ) -> None:
        cfg = IngressConfig.model_validate(config or {})
        self.cfg = cfg
        self.handles = Handles(generator, decoder, tokenizer, recognizer, responder)
        self.store = HistoryStore(
            cfg.history_dir or os.environ.get("HISTORY_DIR") or "history",
            max_turns=cfg.limits.max_history_turns,
            max_bytes=int(cfg.max_history_mb * (1 << 20)),
            retention_s=None if cfg.history_retention_days is None else cfg.history_retention_days * 86400,
        )
        self.voices = VoiceLibrary(cfg.voices_dir or os.environ.get("VOICES_DIR"), tokenizer)
        if not self.voices.exists(cfg.default_voice):
            raise ValueError(f"default voice {cfg.default_voice!r} not found; known: {self.voices.names()}")
        self.tokens, self.anonymous = access(cfg, os.environ)
        self.frontend = Path(cfg.frontend_dir) if cfg.frontend_dir else ROOT / "frontend" / "dist"
        set_torch_threads(1)  # the VAD runs here, per chunk: one thread (see TurnDetector)
        self.vad = load_vad_model()
        self._ending: asyncio.Task | None = None
        self._sweeper: asyncio.Task | None = None
        self._random: bool | None = None
        self._cache: p.CacheBudget | None = None  # the generator's KV cache budget, with `_random`
        # Clients see an opaque tag of the ingress replica (for support and fault tests), not its name.
        replica = serve.get_replica_context().replica_id.to_full_id_str()
        self.replica = hashlib.sha256(replica.encode()).hexdigest()[:12]
        self.slots = asyncio.Semaphore(cfg.max_conversations)
        self.active: dict[int, _Session] = {}
        self.live: dict[str, _Session] = {}  # conversation id -> its socket's session, on this replica
        self.bridged: dict[str, tuple[_Session, asyncio.Task, EventSink]] = {}
        self.bridged_principal: dict[str, str] = {}
        self.bridge = BridgeAccess.resolve(cfg.bridge_token, cfg.bridge_callback_url)
        self.per_token: Counter[str] = Counter()
        self._m_active = metrics.Gauge("csm_conversations_active", description="Open conversations.")
        self._m_turn = metrics.Histogram(
            "csm_turn_latency_seconds",
            description="End of the person's turn (detected or committed) to the first reply audio sent.",
            boundaries=[0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5],
        )
        self._m_first = metrics.Histogram(
            "csm_first_audio_seconds",
            description="Response start to its first audio delta.",
            boundaries=[0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 2, 5],
        )
        self._m_errors = metrics.Counter(
            "csm_errors", description="Error events sent, by code.", tag_keys=("code",)
        )
        self._m_refused = metrics.Counter("csm_conversations_refused", description="Refused: server busy.")
        rows = [16, 64, 256, 512, 1024, 2048, 8192]
        self._m_prefilled = metrics.Histogram(
            "csm_reply_prefilled_rows", description="CSM prompt rows computed per reply.", boundaries=rows
        )
        self._m_reused = metrics.Histogram(
            "csm_reply_reused_rows",
            description="CSM prompt rows per reply taken from the KV cache.",
            boundaries=rows,
        )
        observer = Observer(
            turn_latency=self._m_turn.observe,
            first_audio=self._m_first.observe,
            error=lambda code: self._m_errors.inc(tags={"code": code}),
            prompt_rows=self._observe_prompts,
        )
        self.services = RayServices(self.handles)
        self.shared = Shared(
            self.store,
            self.voices,
            self.vad,
            cfg.limits,
            cfg.default_voice,
            observer,
            streaming_asr=cfg.streaming_asr,
        )
        self.speech = SpeechApi(
            self.services.reply_audio,
            self.voices,
            cfg.speech,
            self._admit_speech,
            cfg.default_voice,
        )

    # ---- pages and health -------------------------------------------------------------------------
    @app.get("/healthz")
    def healthz(self) -> dict:
        return {"ok": True}

    @app.get("/readyz")
    async def readyz(self) -> JSONResponse:
        h = self.handles
        try:
            gen, dec, tok, asr, resp = await asyncio.wait_for(
                asyncio.gather(
                    h.generator.info.remote(),
                    h.decoder.info.remote(),
                    h.tokenizer.info.remote(),
                    h.recognizer.info.remote(),
                    h.responder.info.remote(),
                ),
                timeout=10,
            )
        except Exception:
            log.warning("readyz: a deployment did not answer", exc_info=True)  # details stay in the log
            return JSONResponse({"ready": False, "error": "a model deployment is not ready"}, status_code=503)
        random = bool(gen["random_weights"] or dec["random_weights"] or tok["random_weights"])
        self._random, self._cache = random, p.CacheBudget.of(gen["cache"])
        body = {
            "ready": True,
            "random_weights": random,
            "weights": {
                "csm": gen["weights"],
                "mimi_decoder": dec["weights"],
                "mimi_encoder": tok["weights"],
            },
            "asr": asr.get("backend"),
            "responder": resp.get("backend"),
            "cache": gen["cache"],
            "conversations": len(self.active) + len(self.bridged),
            "max_conversations": self.cfg.max_conversations,
        }
        if random:
            body["warning"] = RANDOM_WARNING.upper()
        return JSONResponse(body)

    @app.get("/v1/voices")
    def list_voices(self) -> dict:
        return {"voices": [{"id": name} for name in self.voices.names()], "default": self.cfg.default_voice}

    # ---- OpenAI's speech API (serve_app.speech_api): the realtime route's token and limits -------------
    @app.post("/v1/audio/speech")
    async def audio_speech(self, request: Request) -> Response:
        principal = self._identify(None, request.headers.get("authorization"))
        return await self.speech.respond(await request.body(), principal)

    @app.get("/v1/models")
    def list_models(self, request: Request) -> JSONResponse:
        if self._identify(None, request.headers.get("authorization")) is None:
            return unauthorized().response()
        return JSONResponse(SpeechApi.models())

    async def _admit_speech(self, principal: str) -> Callable[[], None]:
        """A speech request holds a conversation's place while it streams: the same capacity (503) and
        per-token limit (429) as a socket's."""
        if self._full():
            raise server_busy()
        if not self._take(principal):
            raise over_limit(self._per_token_message())
        await self.slots.acquire()  # free (not `_full`): returns at once

        def release() -> None:
            self.slots.release()
            self._release(principal)

        return release

    @app.get("/")
    async def index(self) -> Response:
        page = self.frontend / "index.html"
        if page.is_file():
            return FileResponse(page)
        return HTMLResponse(_PLACEHOLDER)

    @app.get("/config.json")
    async def page_config(self) -> Response:
        """The page's optional settings (the endpoint); none here means the page's defaults."""
        path = self.frontend / "config.json"
        if path.is_file():
            return FileResponse(path)
        return JSONResponse({"error": "not found"}, status_code=404)

    @app.get("/assets/{name:path}")
    async def asset(self, name: str) -> Response:
        base = (self.frontend / "assets").resolve()
        path = (base / name).resolve()
        if not path.is_relative_to(base) or not path.is_file():
            return JSONResponse({"error": "not found"}, status_code=404)
        return FileResponse(path)

    # ---- the realtime socket ----------------------------------------------------------------------
    @app.websocket("/v1/realtime")
    async def realtime(self, ws: WebSocket) -> None:
        principal = self._identify(ws.query_params.get("token"), ws.headers.get("authorization"))
        if principal is None:
            # Accepted, then closed: a browser sees close code 1008 and a reason (a refused handshake
            # reaches it only as 1006, which looks like a dead server).
            await self._refuse(
                ws, "unauthorized", "a valid token is required (?token=)", 1008, "unauthorized"
            )
            return
        requested = ws.query_params.get("conversation_id")
        if requested is not None:
            try:
                check_conversation_id(requested)
            except ValueError as e:
                await self._refuse(
                    ws, "invalid_event", str(e), 1008, "bad conversation id", "conversation_id"
                )
                return
        await ws.accept()
        if self._full():
            await self._refuse(
                ws, "server_busy", "the server is at capacity; try again shortly", 1013, "server busy"
            )
            return
        if not self._take(principal):
            await self._refuse(
                ws, "limit_exceeded", self._per_token_message(), 1008, "too many conversations"
            )
            return
        async with self.slots, self._holding(principal):
            try:
                lease = await self._claim(requested, principal)
            except ConversationNotFound:
                await self._refuse(ws, "conversation_not_found", NOT_FOUND, 1008, "unknown conversation")
                return
            async with lease:
                session = await self._open_session(lease.conversation_id, lease.history)
                lease.lost = session.take_over
                self.live[lease.conversation_id] = session
                try:
                    await self._serve_socket(ws, session)
                finally:
                    if self.live.get(lease.conversation_id) is session:
                        del self.live[lease.conversation_id]

    async def _refuse(
        self,
        ws: WebSocket,
        code: p.ErrorCode,
        message: str,
        close: int,
        reason: str,
        param: str | None = None,
    ) -> None:
        if ws.client_state.name == "CONNECTING":
            await ws.accept()
        await ws.send_text(p.error_event(code, message, param=param).to_json())
        await ws.close(code=close, reason=reason)

    async def _claim(self, requested: str | None, principal: str) -> "_Lease":
        """The principal's conversation `requested` (its history), or a new one; held until released."""
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        if requested is None:
            conversation_id, history = await self.store.create(principal), []
        else:
            conversation_id, history = requested, await self.store.open(requested, principal)
        holder = p.new_id("conn")
        await self.store.claim(conversation_id, holder)
        older = self.live.get(conversation_id)
        if older is not None:  # on this replica: closed now (on another, at its next lease check)
            older.take_over()
        return _Lease(self.store, conversation_id, holder, history)

    async def _sweep(self) -> None:
        """Delete conversations past their retention: now, then hourly (every replica does; it is cheap)."""
        while True:
            try:
                gone = await self.store.sweep()
                if gone:
                    log.info("history: %d conversations past their retention deleted", gone)
            except OSError:
                log.warning("history sweep failed", exc_info=True)
            await asyncio.sleep(3600)

    async def _serve_socket(self, ws: WebSocket, session: "_Session") -> None:
        self.active[id(session)] = session
        self._count_conversations()
        emit = asyncio.create_task(self._emit(ws, session))
        idle_s = self.cfg.idle_timeout_s
        try:
            wait = idle_s
            while True:
                try:
                    message = await asyncio.wait_for(ws.receive(), timeout=wait)
                except TimeoutError:
                    # Idle: no message for idle_s, and nothing transcribed or spoken for idle_s either
                    # (the clock restarts when a reply ends, not at the person's last message).
                    quiet = session.conversation.quiet_for()
                    if quiet < idle_s:
                        wait = idle_s - quiet
                        continue
                    session.conversation.send(p.error_event("limit_exceeded", "idle for too long; closing"))
                    break
                wait = idle_s
                if message["type"] == "websocket.disconnect":
                    break
                raw = message.get("text") if message.get("text") is not None else message.get("bytes")
                await session.receive(raw or "")
        except WebSocketDisconnect:
            pass
        finally:
            await session.conversation.close()
            session.outbox.put_nowait(None)
            await asyncio.gather(emit, return_exceptions=True)
            self.active.pop(id(session), None)
            self._count_conversations()

    def _full(self) -> bool:
        """Admission: at capacity, a new conversation is refused at once, never queued."""
        if self.slots.locked():
            self._m_refused.inc()
            return True
        return False

    def _count_conversations(self) -> None:
        self._m_active.set(len(self.active) + len(self.bridged))

    async def _emit(self, ws: WebSocket, session: "_Session") -> None:
        while (event := await session.outbox.get()) is not None:
            try:
                await ws.send_text(event.to_json())
            except Exception:  # the socket is gone; the receive loop ends the conversation
                return
        try:
            await ws.close(code=session.close_code, reason=session.close_reason)
        except Exception:
            pass

    async def _open_session(self, conversation_id: str, history: list) -> _Session:
        outbox: asyncio.Queue[p.ServerEvent | None] = asyncio.Queue()
        conversation = Conversation(conversation_id, self.services, self.shared, outbox.put_nowait, history)
        conversation.start()
        outbox.put_nowait(
            p.ServerInfo(
                conversation_id=conversation_id,
                voices=self.voices.names(),
                default_voice=self.cfg.default_voice,
                random_weights=await self._random_weights(),
                cache=self._cache,
                max_reply_seconds=self.cfg.limits.max_reply_seconds,
                replica=self.replica,
            )
        )
        return _Session(conversation, outbox, self.cfg)

    async def _random_weights(self) -> bool:
        """Whether any model runs on random weights; asked once (weights never change in a replica)."""
        if self._random is None:
            h = self.handles
            infos = await asyncio.gather(
                h.generator.info.remote(), h.decoder.info.remote(), h.tokenizer.info.remote()
            )
            self._random = any(info["random_weights"] for info in infos)
            self._cache = p.CacheBudget.of(infos[0]["cache"])
        return self._random

    def _observe_prompts(self, uses: list[PromptUse]) -> None:
        self._m_prefilled.observe(sum(u.prefilled for u in uses))
        self._m_reused.observe(sum(u.reused for u in uses))

    def _identify(self, query_token: str | None, authorization: str | None) -> str | None:
        """The principal a client's token names ("token:<name>"), "anonymous" where that is allowed,
        or None: refused. Every configured token is compared, in constant time each."""
        given = _presented(query_token, authorization)
        if not self.tokens:
            return "anonymous" if self.anonymous else None
        if given is None:
            return None
        found = None
        for name, token in self.tokens.items():
            if hmac.compare_digest(given.encode(), token.encode()):
                found = f"token:{name}"
        return found

    def _take(self, principal: str) -> bool:
        """Count one more conversation for `principal`, unless it already holds its limit."""
        limit = self.cfg.max_conversations_per_token
        if limit is not None and self.per_token[principal] >= limit:
            self._m_refused.inc()
            return False
        self.per_token[principal] += 1
        return True

    def _release(self, principal: str) -> None:
        self.per_token[principal] -= 1
        if self.per_token[principal] <= 0:
            del self.per_token[principal]

    @contextlib.asynccontextmanager
    async def _holding(self, principal: str) -> AsyncIterator[None]:
        try:
            yield
        finally:
            self._release(principal)

    def _per_token_message(self) -> str:
        limit = self.cfg.max_conversations_per_token
        return f"this token already holds {limit} open conversations; close one first"

    # ---- the Lambda bridge ------------------------------------------------------------------------
    @serve.multiplexed(max_num_models_per_replica=4096)
    async def _route(self, connection_id: str) -> str:
        # With header `serve_multiplexed_model_id: <connection id>`, a connection's calls reach one replica.
        return connection_id

    # Connection ids are API Gateway's (base64-like: they may hold '/' and '='), hence `:path`; the
    # events route comes first so that ".../events" is never read as a connection id. Every route
    # takes the bridge's own token first: nothing of a refused call reaches a conversation.
    @app.post("/bridge/connections/{connection_id:path}/events")
    async def bridge_event(self, connection_id: str, request: Request) -> JSONResponse:
        if (refused := self._bridge_refusal(request)) is not None:
            return refused
        await self._route(connection_id)
        entry = self.bridged.get(connection_id)
        if entry is None:
            return JSONResponse({"error": "unknown connection"}, status_code=404)
        await entry[0].receive(await request.body())
        return JSONResponse({"conversation_id": entry[0].conversation.id})

    @app.post("/bridge/connections/{connection_id:path}")
    async def bridge_connect(self, connection_id: str, request: Request) -> JSONResponse:
        if (refused := self._bridge_refusal(request)) is not None:
            return refused
        await self._route(connection_id)
        try:
            body = json.loads(await request.body())
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return JSONResponse({"error": "the body must be a JSON object"}, status_code=400)
        if connection_id in self.bridged:  # the bridge retried a connect we had already done
            return JSONResponse({"conversation_id": self.bridged[connection_id][0].conversation.id})
        try:
            callback = self.bridge.callback(body.get("callback_url"))
            requested, principal = self._bridge_opening(body)
        except BridgeRefused as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)
        if self._full():
            return JSONResponse({"error": "server busy"}, status_code=503)
        if not self._take(principal):
            return JSONResponse({"error": self._per_token_message()}, status_code=429)
        await self.slots.acquire()
        try:
            lease, session = await self._bridge_open(requested, principal)
        except BaseException as e:
            self.slots.release()
            self._release(principal)
            if isinstance(e, BridgeRefused):
                return JSONResponse({"error": str(e)}, status_code=e.status)
            raise
        self.bridged_principal[connection_id] = principal
        sink = ApiGatewaySink(callback)
        task = asyncio.create_task(self._bridge_emit(connection_id, session, sink, lease))
        self.bridged[connection_id] = (session, task, sink)
        self._count_conversations()
        log.info("bridge %s: conversation %s opened", connection_id, lease.conversation_id)
        return JSONResponse({"conversation_id": lease.conversation_id})

    @app.delete("/bridge/connections/{connection_id:path}")
    async def bridge_disconnect(self, connection_id: str, request: Request) -> JSONResponse:
        if (refused := self._bridge_refusal(request)) is not None:
            return refused
        await self._route(connection_id)
        entry = self.bridged.get(connection_id)
        await self._bridge_end(connection_id)
        return JSONResponse({"conversation_id": entry[0].conversation.id if entry else None})

    def _bridge_refusal(self, request: Request) -> JSONResponse | None:
        """None for the bridge itself; otherwise the answer (the users' token is not the bridge's)."""
        try:
            self.bridge.check(request.headers.get("authorization"))
        except BridgeRefused as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)
        return None

    @staticmethod
    def _bridge_opening(body: dict) -> tuple[str | None, str]:
        """(conversation to resume or None, principal) of a connect. The principal is whom the bridge's
        authorizer admitted; it is taken as given because the bridge's token authenticated the caller,
        and it is required: it owns the conversation and counts against its limit."""
        requested = body.get("conversation_id") or None
        principal = body.get("principal")
        if not isinstance(principal, str) or not principal:
            raise BridgeRefused(400, "principal (whom the authorizer admitted) is required")
        try:
            return (None if requested is None else check_conversation_id(requested)), principal
        except ValueError as e:
            raise BridgeRefused(400, str(e)) from e

    async def _bridge_open(self, requested: str | None, principal: str) -> tuple["_Lease", _Session]:
        """The principal's conversation, held (as a direct socket holds it) until the bridged one ends."""
        try:
            lease = await self._claim(requested, principal)
        except ConversationNotFound:
            raise BridgeRefused(404, NOT_FOUND) from None
        try:
            session = await self._open_session(lease.conversation_id, lease.history)
            lease.lost = session.take_over  # a newer connection has it: this one ends
            return lease, session
        except BaseException:
            await self.store.release(lease.conversation_id, lease.holder)
            raise

    async def _bridge_emit(
        self, connection_id: str, session: _Session, sink: EventSink, lease: "_Lease"
    ) -> None:
        async with lease:  # held (and renewed) for as long as the bridged conversation is open
            while (event := await session.outbox.get()) is not None:
                if not await sink.send(connection_id, event.to_json()):
                    log.info(
                        "bridge %s: conversation %s: the connection is gone",
                        connection_id,
                        session.conversation.id,
                    )
                    break
            await session.conversation.close()  # before the lease goes: nothing is written after it
        if session.close_code == CLOSE_TAKEN_OVER:  # a newer connection has the conversation: end this one
            await sink.close(connection_id)
        # The person left (or the conversation closed): end it without waiting on ourselves.
        if connection_id in self.bridged:
            self._ending = asyncio.get_running_loop().create_task(self._bridge_end(connection_id))

    async def _bridge_end(self, connection_id: str) -> None:
        entry = self.bridged.pop(connection_id, None)
        if entry is None:
            return
        session, task, _ = entry
        await session.conversation.close()
        session.outbox.put_nowait(None)
        await asyncio.gather(task, return_exceptions=True)
        self.slots.release()
        self._release(self.bridged_principal.pop(connection_id))
        self._count_conversations()
