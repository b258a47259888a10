"""One conversation: turn-taking, the person's turns, the assistant's replies, and the history.

The ingress feeds `handle(event)` with parsed client events, one at a time, and sends whatever reaches
`send`. Nothing here blocks the receive loop: a finished turn (encode flush, ASR) and a reply (text,
generation, decoding) run as tasks, so audio keeps flowing in while the assistant speaks, and speech
during a reply cancels it (barge-in). Everything outside the conversation that it calls (encoding,
recognition, reply text, generation and decoding) goes through `serve_app.services.Services`; no Ray here.

CSM's context for a reply: the voice's reference segment (pinned first, speaker 0), then the history's
turns, the person as speaker 1 with their encoded speech, the assistant as speaker 0 with the frames it
generated (trimmed to what was heard after a barge-in), then the sentences of this reply already spoken.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from csm.codec import FRAME_SIZE
from csm.engine import EngineFull
from csm.prompt import Segment
from csm.requests import PromptUse, SpeechRequest
from serve_app import protocol as p
from serve_app.history import HistoryStore, Turn, sentence_parts
from serve_app.services import Services
from serve_app.voices import VoiceLibrary
from speech.asr import AgreedWords
from speech.reply_text import ResponderError
from speech.vad import SileroVad, TurnDetector, VadConfig

log = logging.getLogger(__name__)

ASSISTANT, PERSON = 0, 1  # CSM speaker ids
# The VAD runs here for every conversation of the replica: in two worker threads (torch at one thread
# each, see TurnDetector), so a burst of audio never stalls the event loop's sockets.
_VAD_THREADS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="vad")
FRAME_MS = 80
SAMPLES_PER_MS = p.SAMPLE_RATE // 1000


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


@dataclass
class Observer:
    """Where a conversation reports what the ingress measures (metrics live in the ingress replica)."""

    turn_latency: Callable[[float], None] = lambda s: None  # end of turn → first audio delta
    first_audio: Callable[[float], None] = lambda s: None  # response start → first audio delta
    error: Callable[[str], None] = lambda code: None
    prompt_rows: Callable[[list[PromptUse]], None] = lambda uses: None  # per reply: each sentence's prompt


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


class _InputTurn:
    def __init__(
        self,
        services: Services,
        start_ms: int,
        streaming_asr: bool,
        send: Callable[[p.ServerEvent], None],
    ) -> None:
        self.item_id = p.new_id("item")
        self._send = send
        self._words = AgreedWords()
        self.committed = False  # partials stop at the commit: `completed` has the final transcript
        self.stream = services.input_stream(self._partial, streaming_asr)
        self.start_ms = start_ms
        self.started_at = time.time()

    def _partial(self, text: str) -> None:
        delta = "" if self.committed else self._words.update(text)
        if delta:
            self._send(p.ConversationItemInputAudioTranscriptionDelta(item_id=self.item_id, delta=delta))


class _Reply:
    def __init__(self, response: p.RealtimeResponse) -> None:
        self.response = response
        self.item_id = p.new_id("item")
        self.task: asyncio.Task | None = None
        self.cancel_reason: str = "client_cancelled"
        self.audio_samples = 0

    def stop(self, reason: str | None = None) -> None:
        """Cancel the reply's task, once. A second cancel would land in the task's cleanup (closing its
        decoder stream, remembering the heard turn, sending `response.done`) and cut that short: a
        barge-in followed by the page's truncate lost the turn, so the truncate found no item."""
        if self.task is None or self.task.done() or self.task.cancelling():
            return
        if reason is not None:
            self.cancel_reason = reason
        self.task.cancel()


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
        self.streaming_asr = shared.streaming_asr
        self.session = p.RealtimeSession()
        self.system_notes: list[str] = []
        self._vad_model = shared.vad_model
        self.detector: TurnDetector | None = TurnDetector(self._vad_config(), shared.vad_model)
        self._prefix = np.zeros(0, np.int16)  # the last prefix_padding_ms of audio outside a turn
        self._heard_samples = 0  # input audio since the detector started (its timeline)
        self.turn: _InputTurn | None = None
        self._finishing: set[asyncio.Task] = set()  # turns being encoded and transcribed
        self._last_turn_task: asyncio.Task | None = None
        self.reply: _Reply | None = None
        self._turn_ended_at: float | None = None
        self._quiet_since = time.monotonic()  # when the conversation last stopped being busy
        self._segments: dict[str, tuple[int, list[Segment]]] = {}  # a turn's context segments, made once
        self._audio_budget = self.limits.audio_burst_s * p.SAMPLE_RATE
        self._audio_at = time.monotonic()

    # ---- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        self.send(p.SessionCreated(session=self.session))

    async def close(self) -> None:
        """The connection is gone: stop the reply (its heard part is kept), drop the unfinished turn."""
        if self.reply is not None and self.reply.task is not None:
            self.reply.stop()
            await asyncio.gather(self.reply.task, return_exceptions=True)
        if self.turn is not None:
            await self.turn.stream.cancel()
            self.turn = None
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
                    await self._append(event.samples)
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
        turn_detection_was = self.session.audio.input.turn_detection
        self.session = session
        vad = session.audio.input.turn_detection
        if vad is None:
            self.detector = None
        elif turn_detection_was is None or self.detector is None:
            self.detector = TurnDetector(self._vad_config(), self._vad_model)
            self._heard_samples = 0
        else:
            self.detector.update(self._vad_config())
        self.send(p.SessionUpdated(session=session))

    def _vad_config(self) -> VadConfig:
        vad = self.session.audio.input.turn_detection or p.ServerVad()
        return VadConfig(
            threshold=min(max(vad.threshold, 0.01), 0.99),
            prefix_padding_ms=vad.prefix_padding_ms,
            silence_duration_ms=vad.silence_duration_ms,
        )

    def _voice_name(self, session: p.RealtimeSession | None = None) -> str:
        voice = (session or self.session).audio.output.voice
        return self.default_voice if voice == p.DEFAULT_VOICE else voice

    # ---- the person's audio -----------------------------------------------------------------------
    def _audio_allowed(self, samples: int) -> bool:
        """The audio budget: `audio_rate` × real time sustained, `audio_burst_s` at once."""
        now = time.monotonic()
        rate = self.limits.audio_rate * p.SAMPLE_RATE
        burst = self.limits.audio_burst_s * p.SAMPLE_RATE + samples
        self._audio_budget = min(burst, self._audio_budget + (now - self._audio_at) * rate)
        self._audio_at = now
        if samples > self._audio_budget:
            return False
        self._audio_budget -= samples
        return True

    async def _append(self, pcm: np.ndarray) -> None:
        if pcm.size == 0:
            return
        if not self._audio_allowed(pcm.size):
            raise p.ProtocolError(
                "rate_limited",
                f"audio arrives faster than {self.limits.audio_rate:g}x real time; this chunk was dropped",
                "audio",
            )
        vad = self.session.audio.input.turn_detection
        if vad is None:  # push-to-talk: everything until the commit is the turn
            if self.turn is None:
                self.turn = self._new_turn(0)
            self._push_turn_audio(pcm)
            return
        assert self.detector is not None
        detector = self.detector
        events = await asyncio.get_running_loop().run_in_executor(
            _VAD_THREADS, detector.push, pcm.astype(np.float32) / 32768.0
        )
        if self.detector is not detector:  # the session changed the turn detection meanwhile
            return
        if self.turn is None:
            keep = vad.prefix_padding_ms * SAMPLES_PER_MS + pcm.size + 2 * FRAME_SIZE
            self._prefix = np.concatenate([self._prefix, pcm])[-keep:]
        else:
            self._push_turn_audio(pcm)
        self._heard_samples += pcm.size
        for ev in events:
            if ev.kind == "speech_started" and self.turn is None:
                self._speech_started(ev.audio_ms, vad)
            elif ev.kind == "speech_stopped" and self.turn is not None:
                self.send(
                    p.InputAudioBufferSpeechStopped(audio_end_ms=ev.audio_ms, item_id=self.turn.item_id)
                )
                self._commit(auto_response=vad.create_response)

    def _speech_started(self, at_ms: int, vad: p.ServerVad) -> None:
        start_ms = max(at_ms - vad.prefix_padding_ms, 0)
        self.turn = self._new_turn(start_ms)
        # The audio since `start_ms` is at the end of the prefix buffer (the detector trails the input).
        since = (self._heard_samples - start_ms * SAMPLES_PER_MS) if self._heard_samples else 0
        self._push_turn_audio(self._prefix[-since:] if since > 0 else self._prefix[:0])
        self._prefix = self._prefix[:0]
        self.send(p.InputAudioBufferSpeechStarted(audio_start_ms=start_ms, item_id=self.turn.item_id))
        if vad.interrupt_response and self.reply is not None:
            self.reply.stop("turn_detected")

    def _new_turn(self, start_ms: int) -> _InputTurn:
        return _InputTurn(self.services, start_ms, self.streaming_asr, self.send)

    def _push_turn_audio(self, pcm: np.ndarray) -> None:
        assert self.turn is not None
        limit = int(self.limits.max_turn_seconds * p.SAMPLE_RATE)
        room = limit - self.turn.stream.samples
        self.turn.stream.push(pcm[: max(room, 0)])
        if room < pcm.size:
            self.report(
                p.ProtocolError(
                    "limit_exceeded",
                    f"a turn holds at most {self.limits.max_turn_seconds:g} s of audio; it was ended there",
                )
            )
            auto = self.session.audio.input.turn_detection
            self._commit(auto_response=auto is not None and auto.create_response)

    def _commit(self, auto_response: bool = False) -> None:
        if len(self._finishing) >= self.limits.max_turns_finishing:  # the buffer stays as it is
            raise p.ProtocolError(
                "limit_exceeded",
                f"{len(self._finishing)} turns are still being transcribed; commit again once one is done",
            )
        turn, self.turn = self.turn, None
        if turn is None or turn.stream.samples == 0:
            raise p.ProtocolError("empty_buffer", "the input audio buffer is empty: nothing to commit")
        turn.committed = True
        if self.detector is not None and self.detector.speaking:
            self.detector.reset()  # a manual commit mid-speech: the next speech is a new turn
            self._heard_samples = 0
        previous = self.history[-1].item_id if self.history else None
        self.send(p.InputAudioBufferCommitted(item_id=turn.item_id, previous_item_id=previous))
        self._turn_ended_at = time.perf_counter()
        task = asyncio.get_running_loop().create_task(self._finish_turn(turn, previous))
        self._finishing.add(task)
        task.add_done_callback(self._turn_finished)
        self._last_turn_task = task
        if auto_response:
            self._create_response(None)

    async def _finish_turn(self, turn: _InputTurn, previous: str | None) -> None:
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
        self.send(p.ConversationItemAdded(item=item, previous_item_id=previous))
        self.send(
            p.ConversationItemInputAudioTranscriptionCompleted(
                item_id=turn.item_id,
                transcript=text,
                usage=p.TranscriptionUsage(seconds=round(audio.size / p.SAMPLE_RATE, 3)),
            )
        )
        self.send(p.ConversationItemDone(item=item, previous_item_id=previous))
        await self._remember(Turn(turn.item_id, "user", text, codes, turn.started_at, time.time()))

    async def _clear(self) -> None:
        if self.turn is not None:
            await self.turn.stream.cancel()
            self.turn = None
        if self.detector is not None:
            self.detector.reset()
        self._heard_samples = 0
        self._prefix = self._prefix[:0]
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
        self.send(p.ConversationItemAdded(item=item, previous_item_id=previous))
        self.send(p.ConversationItemDone(item=item, previous_item_id=previous))
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
    def _create_response(self, params: p.ResponseParams | None) -> None:
        if self.reply is not None:
            raise p.ProtocolError(
                "response_in_progress", "a response is already in progress; cancel it first"
            )
        if params is not None and len(params.instructions or "") > self.limits.max_text_chars:
            raise p.ProtocolError(
                "limit_exceeded",
                f"instructions over {self.limits.max_text_chars} characters",
                "response.instructions",
            )
        response = p.RealtimeResponse(conversation_id=self.id)
        reply = _Reply(response)
        self.reply = reply
        self.send(p.ResponseCreated(response=response))
        reply.task = asyncio.get_running_loop().create_task(self._respond(reply, params))

    def _cancel_response(self, response_id: str | None) -> None:
        reply = self.reply
        if reply is None or reply.task is None:
            raise p.ProtocolError("no_active_response", "there is no response in progress")
        if response_id is not None and response_id != reply.response.id:
            raise p.ProtocolError(
                "no_active_response", f"response {response_id!r} is not in progress", "response_id"
            )
        reply.stop("client_cancelled")

    async def _respond(self, reply: _Reply, params: p.ResponseParams | None) -> None:
        response, item_id = reply.response, reply.item_id
        sampling = self.session.x_sampling
        if params is not None and params.x_sampling is not None:
            sampling = p.merge_update(sampling, params.x_sampling)
        instructions = params.instructions if params and params.instructions is not None else None
        audio = self.services.reply_audio()
        spoken: list[tuple[str, int]] = []  # each sentence and its frames, as generated
        started = time.perf_counter()
        turn_ended_at, self._turn_ended_at = self._turn_ended_at, None
        first_audio = True
        status = p.ResponseStatusDetails(type="completed")
        item = p.Item(id=item_id, role="assistant", status="in_progress", content=[p.OutputAudio()])
        self.send(p.ResponseOutputItemAdded(response_id=response.id, item=item))
        self.send(p.ResponseContentPartAdded(response_id=response.id, item_id=item_id))
        try:
            if self._last_turn_task is not None:  # the turn being answered must be in the history first
                await asyncio.gather(self._last_turn_task, return_exceptions=True)
            voice_name = self._voice_name()
            voice = await self.voices.get(voice_name)
            history = self._history_segments(voice)
            budget = int(min(sampling.max_reply_seconds, self.limits.max_reply_seconds) * 1000 / FRAME_MS)
            sentences = self.services.reply_text(
                self._instructions(instructions), [{"role": t.role, "text": t.text} for t in self.history]
            )
            async for sentence in sentences:
                if budget <= 0:
                    status = p.ResponseStatusDetails(type="incomplete", reason="max_output_tokens")
                    break
                text = sentence if not spoken else " " + sentence
                self.send(
                    p.ResponseOutputAudioTranscriptDelta(response_id=response.id, item_id=item_id, delta=text)
                )
                request = SpeechRequest(
                    text=sentence,
                    speaker=ASSISTANT,
                    # This reply's earlier sentences, so the voice and prosody carry on.
                    context=history + _segments(ASSISTANT, sentence_parts(spoken, audio.codes())),
                    keep_first=1 if voice is not None else 0,
                    max_frames=min(frames_for(sentence), budget),
                    temperature=sampling.temperature,
                    top_k=sampling.top_k,
                    seed=None if sampling.seed is None else sampling.seed + len(spoken),
                    conversation_id=self.id,
                    voice=voice_name if voice is not None else None,
                )
                before = len(audio.frames)
                spoken.append((sentence, 0))
                async for chunk in audio.speak(request):
                    self.send(
                        p.ResponseOutputAudioDelta(
                            response_id=response.id, item_id=item_id, delta=p.encode_pcm16(chunk.pcm)
                        )
                    )
                    reply.audio_samples += chunk.pcm.size
                    if first_audio:
                        first_audio = False
                        self.observe.first_audio(time.perf_counter() - started)
                        if turn_ended_at is not None:
                            self.observe.turn_latency(time.perf_counter() - turn_ended_at)
                spoken[-1] = (sentence, len(audio.frames) - before)
                budget -= spoken[-1][1]
        except asyncio.CancelledError:
            status = p.ResponseStatusDetails(type="cancelled", reason=reply.cancel_reason)  # type: ignore[arg-type]
        except EngineFull:
            status = self._failed("server_busy", "the server is at capacity; try again shortly")
        except ResponderError as e:
            status = self._failed("response_failed", f"the reply text failed: {e.message}")
        except ValueError as e:
            status = self._failed("response_failed", str(e))
        except Exception as e:  # a replica died mid-reply, ...: this reply fails, the conversation goes on
            log.exception("conversation %s: reply %s failed", self.id, response.id)
            status = self._failed("response_failed", f"generating the reply failed ({type(e).__name__})")
        finally:
            await audio.close()
        if spoken:  # a sentence cut short by a barge-in or an error keeps the frames it made
            spoken[-1] = (spoken[-1][0], len(audio.frames) - sum(n for _, n in spoken[:-1]))
        transcript = " ".join(text for text, _ in spoken)
        codes = audio.codes()
        if spoken:
            turn = Turn(
                item_id,
                "assistant",
                transcript,
                codes if codes.size else None,
                time.time(),
                time.time(),
                sentences=spoken,
            )
            await self._remember(turn)
        if audio.prompts:
            self.observe.prompt_rows(audio.prompts)
        part = p.AudioPart(transcript=transcript)
        done_item = p.Item(
            id=item_id,
            role="assistant",
            status="completed" if status.type == "completed" else "incomplete",
            content=[p.OutputAudio(transcript=transcript)],
        )
        self.send(p.ResponseOutputAudioDone(response_id=response.id, item_id=item_id))
        self.send(
            p.ResponseOutputAudioTranscriptDone(
                response_id=response.id, item_id=item_id, transcript=transcript
            )
        )
        self.send(p.ResponseContentPartDone(response_id=response.id, item_id=item_id, part=part))
        self.send(p.ResponseOutputItemDone(response_id=response.id, item=done_item))
        usage = p.PromptRows.of([(u.rows, u.reused) for u in audio.prompts]) if audio.prompts else None
        final = response.model_copy(
            update={"status": status.type, "status_details": status, "output": [done_item], "x_prompt": usage}
        )
        self.send(p.ResponseDone(response=final))
        if self.reply is reply:
            self.reply = None
        self._note_quiet()

    def _failed(self, code: p.ErrorCode, message: str) -> p.ResponseStatusDetails:
        self.report(p.ProtocolError(code, message))
        return p.ResponseStatusDetails(
            type="failed", error=p.ResponseError(type="server_error", code=code, message=message)
        )

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
                cached = (t.frames, _segments(ASSISTANT if t.role == "assistant" else PERSON, t.parts()))
            made[t.item_id] = cached
            segments += cached[1]
        self._segments = made  # turns trimmed from the history leave with it
        return segments


def _segments(speaker: int, parts: list[tuple[str, np.ndarray | None]]) -> list[Segment]:
    """Context segments of one turn's parts: the same for a reply's sentences while it is spoken and once
    it is in the history, so its rows are the same in both (the engine's cached prefix)."""
    return [Segment(speaker, text.strip() or "...", codes) for text, codes in parts]


def frames_for(sentence: str) -> int:
    """Frames to allow for speaking `sentence`: ~15 characters a second, plus slack; CSM ends a sentence
    earlier with its EOS frame (random weights never do, so this is also the noise's length)."""
    seconds = 0.6 + len(sentence) / 15.0 * 1.3
    return max(12, math.ceil(seconds * 1000 / FRAME_MS))
