"""One conversation: the session, the person's committed turns, the assistant's replies, and the history.

The ingress feeds `handle(event)` with parsed client events, one at a time, and sends whatever reaches
`send`. Nothing here blocks the receive loop: a finished turn (encode flush, ASR) and a reply (text,
generation, decoding) run as tasks, so audio keeps flowing in while the assistant speaks, and speech
during a reply cancels it (barge-in). The person's audio until a commit is `serve_app.listener`'s; one
reply, from `response.created` to `response.done`, is `serve_app.reply`'s. Everything outside the
conversation that it calls (encoding, recognition, reply text, generation and decoding) goes through
`serve_app.services.Services`; no Ray here.

CSM's context for a reply: the voice's reference segment (pinned first, speaker 0), then the history's
turns, the person as speaker 1 with their encoded speech, the assistant as speaker 0 with the frames it
generated (trimmed to what was heard after a barge-in), then the sentences of this reply already spoken.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from csm.audio import FRAME_MS, SAMPLE_RATE
from csm.prompt import Segment
from serve_app import protocol as p
from serve_app.history import HistoryStore, Turn
from serve_app.listener import InputTurn, Listener
from serve_app.reply import ASSISTANT, PERSON, Observer, Reply, ReplyPrompt, turn_segments
from serve_app.services import Services
from serve_app.voices import VoiceLibrary
from speech.vad import SileroVad

log = logging.getLogger(__name__)


class Limits(BaseModel):
    """Per-conversation limits (DESIGN section 7); the README lists them."""

    model_config = ConfigDict(extra="forbid")

    max_turn_seconds: float = Field(60.0, gt=0)  # the person's audio in one turn
    max_reply_seconds: float = Field(30.0, gt=0)  # audio in one reply (a client may ask for less)
    max_text_chars: int = Field(2000, ge=1)  # one typed turn, and the instructions
    max_history_turns: int = Field(200, ge=1)  # kept in memory; CSM's context keeps what fits anyway
    max_system_notes: int = Field(32, ge=0)  # system messages kept; each goes into every reply's prompt
    max_turns_finishing: int = Field(2, ge=1)  # committed turns still being encoded and transcribed
    # The person's audio may arrive at most this much faster than real time, sustained, beyond a burst
    # (a page catching up after a network hiccup): over it, chunks are refused, so one client cannot make
    # the VAD and the recognizer work at 50x real time.
    audio_rate: float = Field(1.2, gt=0)
    audio_burst_s: float = Field(2.0, ge=0)


@dataclass(frozen=True)
class Shared:
    """What every conversation of a replica shares besides its services: made once, passed to each."""

    store: HistoryStore
    voices: VoiceLibrary
    vad_model: SileroVad
    limits: Limits
    default_voice: str
    observer: Observer = field(default_factory=Observer)
    streaming_asr: bool = True  # recognize turns while spoken (else once each turn ends)


class Conversation:
    def __init__(
        self,
        conversation_id: str,
        services: Services,
        shared: Shared,
        send: Callable[[p.ServerEvent], None],
        history: list[Turn],
    ) -> None:
        self.id = conversation_id
        self.services = services
        self.store = shared.store
        self.voices = shared.voices
        self.send = send
        self.limits = shared.limits
        self.history = history
        self.observe = shared.observer
        self.default_voice = shared.default_voice
        self.session = p.RealtimeSession()
        self.system_notes: list[str] = []
        self.listener = Listener(
            services,
            self.limits,
            shared.vad_model,
            shared.streaming_asr,
            send,
            self.report,
            speech_started=self._speech_started,
            end_turn=self._commit,
        )
        self._finishing: set[asyncio.Task] = set()  # turns being encoded and transcribed
        self._last_turn_task: asyncio.Task | None = None
        self.reply: Reply | None = None
        self._quiet_since = time.monotonic()  # when the conversation last stopped being busy
        self._segments: dict[str, tuple[int, list[Segment]]] = {}  # a turn's context segments, made once

    # ---- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        self.send(p.SessionCreated(session=self.session))

    async def close(self) -> None:
        """The connection is gone: stop the reply (its heard part is kept), drop the unfinished turn."""
        if self.reply is not None and self.reply.task is not None:
            self.reply.stop()
            await asyncio.gather(self.reply.task, return_exceptions=True)
        await self.listener.drop()
        for task in list(self._finishing):
            await asyncio.gather(task, return_exceptions=True)

    @property
    def busy(self) -> bool:
        """A turn is being transcribed or a reply spoken: a quiet client is listening, not idle."""
        return self.reply is not None or bool(self._finishing)

    def quiet_for(self) -> float:
        """Seconds since the conversation was last busy; 0 while it is. The person may be silent this
        long and still be listening to, or thinking about, the end of the last reply."""
        return 0.0 if self.busy else time.monotonic() - self._quiet_since

    def _note_quiet(self) -> None:
        if not self.busy:
            self._quiet_since = time.monotonic()

    def _turn_finished(self, task: asyncio.Task) -> None:
        self._finishing.discard(task)
        self._note_quiet()

    # ---- client events ----------------------------------------------------------------------------
    async def handle(self, event: p.ClientEvent) -> None:
        try:
            match event:
                case p.SessionUpdate():
                    self._update_session(event)
                case p.InputAudioBufferAppend():
                    await self.listener.append(event.samples)
                case p.InputAudioBufferCommit():
                    self._commit()
                case p.InputAudioBufferClear():
                    await self._clear()
                case p.ConversationItemCreate():
                    await self._create_item(event)
                case p.ConversationItemTruncate():
                    await self._truncate(event)
                case p.ResponseCreate():
                    self._create_response(event.response)
                case p.ResponseCancel():
                    self._cancel_response(event.response_id)
        except p.ProtocolError as e:
            if e.event_id is None:
                e.event_id = event.event_id
            self.report(e)

    def report(self, e: p.ProtocolError) -> None:
        """Send one `error` event for `e` (and count it); the conversation goes on."""
        self.observe.error(e.code)
        self.send(e.to_event())

    # ---- session ----------------------------------------------------------------------------------
    def _update_session(self, event: p.SessionUpdate) -> None:
        session = self.session.apply(event.session)
        voice = self._voice_name(session)
        if not self.voices.exists(voice):
            raise p.ProtocolError(
                "invalid_event",
                f"unknown voice {voice!r}; known: {self.voices.names()}",
                "session.audio.output.voice",
            )
        if len(session.instructions) > self.limits.max_text_chars:
            raise p.ProtocolError(
                "limit_exceeded",
                f"instructions over {self.limits.max_text_chars} characters",
                "session.instructions",
            )
        self.session = session
        self.listener.configure(session.audio.input.turn_detection)
        self.send(p.SessionUpdated(session=session))

    def _voice_name(self, session: p.RealtimeSession | None = None) -> str:
        return self._server_voice((session or self.session).audio.output.voice)

    def _server_voice(self, voice: str) -> str:
        return self.default_voice if voice == p.DEFAULT_VOICE else voice

    # ---- the person's turns ----------------------------------------------------------------------
    def _speech_started(self, vad: p.ServerVad) -> None:
        if vad.interrupt_response and self.reply is not None:
            self.reply.stop("turn_detected")

    def _commit(self, auto_response: bool = False) -> None:
        if len(self._finishing) >= self.limits.max_turns_finishing:  # the buffer stays as it is
            raise p.ProtocolError(
                "limit_exceeded",
                f"{len(self._finishing)} turns are still being transcribed; commit again once one is done",
            )
        turn = self.listener.take_turn()
        if turn is None:
            raise p.ProtocolError("empty_buffer", "the input audio buffer is empty: nothing to commit")
        previous = self.history[-1].item_id if self.history else None
        self.send(p.InputAudioBufferCommitted(item_id=turn.item_id, previous_item_id=previous))
        ended_at = time.perf_counter()
        task = asyncio.get_running_loop().create_task(self._finish_turn(turn, previous))
        self._finishing.add(task)
        task.add_done_callback(self._turn_finished)
        self._last_turn_task = task
        if auto_response:
            self._create_response(None, turn_ended_at=ended_at)

    async def _finish_turn(self, turn: InputTurn, previous: str | None) -> None:
        """Encode the rest, transcribe, add the turn to the history (in the order turns were committed)."""
        earlier = [t for t in self._finishing if t is not asyncio.current_task()]
        audio = turn.stream.audio()
        stream = turn.stream
        try:
            if stream.streaming_asr:  # recognized while spoken: only the last chunk is left
                text = stream.finish_transcript()
            else:
                text = self.services.transcribe(audio.astype(np.float32) / 32768.0)
            codes, text = await asyncio.gather(stream.finish(), text)
        except Exception as e:
            log.exception("conversation %s: turn %s failed", self.id, turn.item_id)
            self.report(p.ProtocolError("response_failed", f"processing the turn failed: {type(e).__name__}"))
            return
        await asyncio.gather(*earlier, return_exceptions=True)
        item = p.Item(id=turn.item_id, role="user", content=[p.InputAudio(transcript=text)])
        transcribed = p.ConversationItemInputAudioTranscriptionCompleted(
            item_id=turn.item_id,
            transcript=text,
            usage=p.TranscriptionUsage(seconds=round(audio.size / SAMPLE_RATE, 3)),
        )
        for ev in p.item_created(item, previous, transcribed):
            self.send(ev)
        await self._remember(Turn(turn.item_id, "user", text, codes, turn.started_at, time.time()))

    async def _clear(self) -> None:
        await self.listener.clear()
        self.send(p.InputAudioBufferCleared())

    # ---- items ------------------------------------------------------------------------------------
    async def _create_item(self, event: p.ConversationItemCreate) -> None:
        message = event.item
        text = message.text.strip()
        if not text:
            raise p.ProtocolError("invalid_event", "the message has no text", "item.content")
        if len(text) > self.limits.max_text_chars:
            raise p.ProtocolError(
                "limit_exceeded", f"text over {self.limits.max_text_chars} characters", "item"
            )
        if message.role == "system" and len(self.system_notes) >= self.limits.max_system_notes:
            raise p.ProtocolError(
                "limit_exceeded",
                f"a conversation keeps at most {self.limits.max_system_notes} system notes",
                "item",
            )
        item = message.to_item()
        previous = self.history[-1].item_id if self.history else None
        for ev in p.item_created(item, previous):
            self.send(ev)
        if message.role == "system":
            self.system_notes.append(text)
            return
        await self._remember(Turn(item.id, "user", text, None))

    async def _truncate(self, event: p.ConversationItemTruncate) -> None:
        if self.reply is not None and self.reply.item_id == event.item_id and self.reply.task is not None:
            self.reply.stop()  # truncating the reply being spoken ends it first
            await asyncio.gather(self.reply.task, return_exceptions=True)
        turn = next((t for t in self.history if t.item_id == event.item_id), None)
        if turn is None:
            raise p.ProtocolError(
                "item_not_found", f"no item {event.item_id!r} in the conversation", "item_id"
            )
        if turn.role != "assistant":
            raise p.ProtocolError("invalid_event", "only the assistant's audio can be truncated", "item_id")
        if event.audio_end_ms > turn.frames * FRAME_MS:
            raise p.ProtocolError(
                "invalid_event",
                f"audio_end_ms {event.audio_end_ms} is past the item's {turn.frames * FRAME_MS} ms of audio",
                "audio_end_ms",
            )
        frames = math.ceil(event.audio_end_ms / FRAME_MS)
        turn.truncate(frames)
        await self.store.truncate(self.id, turn.item_id, frames)
        self.send(p.ConversationItemTruncated(item_id=turn.item_id, audio_end_ms=event.audio_end_ms))

    async def _remember(self, turn: Turn) -> None:
        self.history.append(turn)
        del self.history[: -self.limits.max_history_turns]
        await self.store.append(self.id, turn)

    # ---- replies ----------------------------------------------------------------------------------
    def _create_response(self, params: p.ResponseParams | None, turn_ended_at: float | None = None) -> None:
        """Start a reply; `turn_ended_at` (perf_counter) when it answers a turn that just ended."""
        if self.reply is not None:
            raise p.ProtocolError(
                "response_in_progress", "a response is already in progress; cancel it first"
            )
        params = params or p.ResponseParams()
        if len(params.instructions or "") > self.limits.max_text_chars:
            raise p.ProtocolError(
                "limit_exceeded",
                f"instructions over {self.limits.max_text_chars} characters",
                "response.instructions",
            )
        asked = params.audio.output.voice if params.audio and params.audio.output else None
        voice = self._voice_name() if asked is None else self._server_voice(asked)
        if asked is not None and not self.voices.exists(voice):
            raise p.ProtocolError(
                "invalid_event",
                f"unknown voice {voice!r}; known: {self.voices.names()}",
                "response.audio.output.voice",
            )
        sampling = self.session.x_sampling
        if params.x_sampling is not None:
            sampling = p.merge_update(sampling, params.x_sampling)
        max_frames = int(min(sampling.max_reply_seconds, self.limits.max_reply_seconds) * 1000 / FRAME_MS)
        tokens = params.max_output_tokens or self.session.max_output_tokens
        if tokens != "inf":  # one output token is one audio frame
            max_frames = min(max_frames, tokens)
        response = p.RealtimeResponse(
            conversation_id=self.id, max_output_tokens=tokens, metadata=params.metadata
        )
        reply = Reply(response, sampling, max_frames, self.services, self.send, self.observe)
        self.reply = reply
        self.send(p.ResponseCreated(response=response))
        prompt = self._reply_prompt(voice, params.instructions)
        reply.task = asyncio.get_running_loop().create_task(self._respond(reply, prompt, turn_ended_at))

    def _cancel_response(self, response_id: str | None) -> None:
        reply = self.reply
        if reply is None or reply.task is None:
            raise p.ProtocolError("no_active_response", "there is no response in progress")
        if response_id is not None and response_id != reply.response.id:
            raise p.ProtocolError(
                "no_active_response", f"response {response_id!r} is not in progress", "response_id"
            )
        reply.stop("client_cancelled")

    async def _respond(
        self, reply: Reply, prompt: Callable[[], Awaitable[ReplyPrompt]], turn_ended_at: float | None
    ) -> None:
        try:
            await reply.run(prompt, self._remember, turn_ended_at)
        finally:
            if self.reply is reply:
                self.reply = None
            self._note_quiet()

    def _reply_prompt(
        self, voice_name: str, instructions: str | None
    ) -> Callable[[], Awaitable[ReplyPrompt]]:
        """What the reply speaks from, made once the turn it answers is in the history."""

        async def prompt() -> ReplyPrompt:
            if self._last_turn_task is not None:  # the turn being answered must be in the history first
                await asyncio.gather(self._last_turn_task, return_exceptions=True)
            voice = await self.voices.get(voice_name)
            return ReplyPrompt(
                instructions=self._instructions(instructions),
                messages=[{"role": t.role, "text": t.text} for t in self.history],
                context=self._history_segments(voice),
                voice=voice_name if voice is not None else None,
            )

        return prompt

    def _instructions(self, override: str | None) -> str:
        parts = [override if override is not None else self.session.instructions, *self.system_notes]
        return "\n".join(x for x in parts if x)

    def _history_segments(self, voice) -> list[Segment]:
        """CSM's context before this reply: the voice's reference, then every turn (a reply sentence by
        sentence). Append-only: each turn's segments are made once, and the next reply's context extends
        this one row for row, so the generator's cached rows stay a prefix (the cut of old turns aside,
        see `csm.prompt.first_kept`)."""
        # Codes travel as arrays: Ray ships them out of band, ~25x cheaper than tensors for a long context.
        segments = [] if voice is None else [Segment(ASSISTANT, voice.text, voice.codes)]
        made: dict[str, tuple[int, list[Segment]]] = {}
        for t in self.history:
            cached = self._segments.get(t.item_id)
            if cached is None or cached[0] != t.frames:  # new, or truncated since
                cached = (t.frames, turn_segments(ASSISTANT if t.role == "assistant" else PERSON, t.parts()))
            made[t.item_id] = cached
            segments += cached[1]
        self._segments = made  # turns trimmed from the history leave with it
        return segments
