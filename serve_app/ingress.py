"""`ConversationIngress`: the HTTP and WebSocket front of the app (FastAPI inside a Serve deployment).

Routes: `/` (the page, `serve_app.pages`), `/healthz`, `/readyz` (which weights run, and "random weights"
loudly), `/v1/voices`, `/v1/models`, `/v1/audio/speech` (OpenAI's speech API, `serve_app.speech_api`),
`/v1/realtime` (the realtime WebSocket), and `/bridge/connections/{id}` (the Lambda bridge's path,
`serve_app.bridge`). Conversations, over either, open and close through `serve_app.sessions`. A socket's
life: token check → `Sessions.open` (admission, the history lease) → a receive loop and an emit loop →
`Sessions.close` in `finally`. Only the emit loop writes to the socket.
"""

# No `from __future__ import annotations` here: FastAPI reads the route methods' annotations at runtime
# (a string `WebSocket` annotation would make the socket a query parameter and refuse every connection).

import asyncio
import hashlib
import hmac
import logging
import os
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve import metrics
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle

from csm.requests import PromptUse
from deployments.routing import ConnectionRouter
from deployments.weights import RANDOM_WARNING, set_torch_threads
from serve_app import protocol as p
from serve_app.bridge import BridgeAccess, BridgedConversations, bearer_token
from serve_app.conversation import Shared
from serve_app.history import HistoryStore, check_conversation_id
from serve_app.ingress_config import IngressConfig, access
from serve_app.pages import Pages
from serve_app.principals import ClusterCounts
from serve_app.reply import Observer
from serve_app.services import Handles, RayServices
from serve_app.sessions import Refused, Session, Sessions
from serve_app.speech_api import SpeechApi, over_limit, server_busy, unauthorized
from serve_app.voices import VoiceLibrary
from speech.vad import load_vad_model

log = logging.getLogger(__name__)

# A refused socket's close code and reason, by the error it was sent first.
_SOCKET_REFUSED = {
    "server_busy": (1013, "server busy"),
    "limit_exceeded": (1008, "too many conversations"),
    "conversation_not_found": (1008, "unknown conversation"),
}


def _presented(query_token: str | None, authorization: str | None) -> str | None:
    """The token a client presented: `?token=` (browsers cannot set headers), else `Authorization: Bearer`."""
    return query_token if query_token is not None else bearer_token(authorization)


app = FastAPI(title="CSM voice conversations", docs_url=None, redoc_url=None)


# A bridged connection's calls reach the replica holding it (`ConnectionRouter`), whatever the proxy.
@serve.deployment(
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=1000,
    request_router_config=RequestRouterConfig(request_router_class=ConnectionRouter),
)
@serve.ingress(app)
class ConversationIngress:
    def __init__(
        self,
        generator: DeploymentHandle,
        decoder: DeploymentHandle,
        tokenizer: DeploymentHandle,
        recognizer: DeploymentHandle,
        responder: DeploymentHandle,
        config: IngressConfig | dict | None = None,
    ) -> None:
        cfg = IngressConfig.model_validate(config or {})
        self.cfg = cfg
        self.handles = Handles(generator, decoder, tokenizer, recognizer, responder)
        store = HistoryStore(
            cfg.history_dir or os.environ.get("HISTORY_DIR") or "history",
            max_turns=cfg.limits.max_history_turns,
            max_bytes=int(cfg.max_history_mb * (1 << 20)),
            retention_s=None if cfg.history_retention_days is None else cfg.history_retention_days * 86400,
        )
        self.voices = VoiceLibrary(cfg.voices_dir or os.environ.get("VOICES_DIR"), tokenizer)
        if not self.voices.exists(cfg.default_voice):
            raise ValueError(f"default voice {cfg.default_voice!r} not found; known: {self.voices.names()}")
        self.tokens, self.anonymous = access(cfg, os.environ)
        self.pages = Pages(cfg.frontend_dir)
        set_torch_threads(1)  # the VAD runs here, per chunk: one thread (see TurnDetector)
        self._random: bool | None = None
        self._cache: p.CacheBudget | None = None  # the generator's KV cache budget, with `_random`
        # Clients see an opaque tag of the ingress replica (for support and fault tests), not its name.
        context = serve.get_replica_context()
        replica = context.replica_id.to_full_id_str()
        self.replica = hashlib.sha256(replica.encode()).hexdigest()[:12]
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
        shared = Shared(
            store,
            self.voices,
            load_vad_model(),
            cfg.limits,
            cfg.default_voice,
            observer,
            streaming_asr=cfg.streaming_asr,
        )
        # A per-token limit is one for the app, whichever replica a conversation lands on.
        cluster = None
        if cfg.max_conversations_per_token is not None:
            cluster = ClusterCounts(self.replica, scope=context.app_name)
        self.sessions = Sessions(
            cfg, self.services, shared, self._server_info, self._m_active.set, self._m_refused.inc, cluster
        )
        self.bridge = BridgedConversations(
            BridgeAccess.resolve(cfg.bridge_token, cfg.bridge_callback_url), self.sessions
        )
        self.speech = SpeechApi(
            self.services.reply_audio,
            self.voices,
            cfg.speech,
            self._admit_speech,
            cfg.default_voice,
        )

    # ---- health and readiness ---------------------------------------------------------------------
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
            "conversations": len(self.sessions.active),
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
        try:
            return await self.sessions.admit(principal)
        except Refused as e:
            raise server_busy() if e.code == "server_busy" else over_limit(str(e)) from None

    # ---- the page (serve_app.pages) ---------------------------------------------------------------
    @app.get("/")
    async def index(self) -> Response:
        return self.pages.index()

    @app.get("/config.json")
    async def page_config(self) -> Response:
        return self.pages.config()

    @app.get("/assets/{name:path}")
    async def asset(self, name: str) -> Response:
        return self.pages.asset(name)

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
        try:
            session = await self.sessions.open(principal, requested)
        except Refused as e:
            await self._refuse(ws, e.code, str(e), *_SOCKET_REFUSED[e.code])
            return
        emit = asyncio.create_task(self._emit(ws, session))
        try:
            await self._receive(ws, session)
        finally:
            await self.sessions.close(session)
            await asyncio.gather(emit, return_exceptions=True)

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

    async def _receive(self, ws: WebSocket, session: Session) -> None:
        """Client messages to the session until the socket closes or the conversation is idle too long."""
        idle_s = self.cfg.idle_timeout_s
        wait = idle_s
        try:
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
                    return
                wait = idle_s
                if message["type"] == "websocket.disconnect":
                    return
                raw = message.get("text") if message.get("text") is not None else message.get("bytes")
                await session.receive(raw or "")
        except WebSocketDisconnect:
            pass

    async def _emit(self, ws: WebSocket, session: Session) -> None:
        while (event := await session.outbox.get()) is not None:
            try:
                await ws.send_text(event.to_json())
            except Exception:  # the socket is gone; the receive loop ends the conversation
                return
        try:
            await ws.close(code=session.close_code, reason=session.close_reason)
        except Exception:
            pass

    # ---- what the sessions are told ---------------------------------------------------------------
    async def _server_info(self, conversation_id: str) -> p.ServerInfo:
        """A conversation's `x-server.info`, sent right after `session.created`."""
        return p.ServerInfo(
            conversation_id=conversation_id,
            voices=self.voices.names(),
            default_voice=self.cfg.default_voice,
            random_weights=await self._random_weights(),
            cache=self._cache,
            max_reply_seconds=self.cfg.limits.max_reply_seconds,
            replica=self.replica,
        )

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

    # ---- the Lambda bridge (serve_app.bridge) -------------------------------------------------------
    # Connection ids are API Gateway's (base64-like: they may hold '/' and '='), hence `:path`; the
    # events route comes first so that ".../events" is never read as a connection id. Every route
    # takes the bridge's own token first: nothing of a refused call reaches a conversation. The
    # connection id also comes as `serve_multiplexed_model_id`, by which `ConnectionRouter` routes.
    @app.post("/bridge/connections/{connection_id:path}/events")
    async def bridge_event(self, connection_id: str, request: Request) -> JSONResponse:
        return await self._bridged(connection_id, request, self.bridge.event)

    @app.post("/bridge/connections/{connection_id:path}")
    async def bridge_connect(self, connection_id: str, request: Request) -> JSONResponse:
        return await self._bridged(connection_id, request, self.bridge.connect)

    @app.delete("/bridge/connections/{connection_id:path}")
    async def bridge_disconnect(self, connection_id: str, request: Request) -> JSONResponse:
        return await self._bridged(connection_id, request, lambda cid, _body: self.bridge.disconnect(cid))

    async def _bridged(
        self,
        connection_id: str,
        request: Request,
        call: Callable[[str, bytes], Awaitable[JSONResponse]],
    ) -> JSONResponse:
        if (refused := self.bridge.refusal(request.headers.get("authorization"))) is not None:
            return refused
        return await call(connection_id, await request.body())
