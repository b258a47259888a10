"""One reply of the assistant, from `response.created` to `response.done`.

A `Reply` speaks the responder's sentences one by one: each sentence's text goes out as a transcript delta,
then CSM speaks it with the conversation's context plus this reply's earlier sentences, so the voice and
prosody carry on. It ends when the text ends, the frame budget is spent (`incomplete`), it is stopped
(barge-in, `response.cancel`: `cancelled`) or something fails (`failed`, with one `error` event); however it
ends, the sentences it made (cut to what was generated) go into the history, and it closes with the done
events and `response.done`, which carries the status and how the prompts were paid for.

The conversation decides what the reply speaks from (`ReplyPrompt`) and keeps the history; the reply
owns everything between.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from csm.audio import FRAME_MS
from csm.engine import EngineFull
from csm.prompt import Segment
from csm.requests import PromptUse, SpeechRequest
from serve_app import protocol as p
from serve_app.history import Turn, sentence_parts
from serve_app.services import ReplyAudio, Services
from speech.reply_text import ResponderError

log = logging.getLogger(__name__)

ASSISTANT, PERSON = 0, 1  # CSM speaker ids
_COMPLETED = p.ResponseStatusDetails(type="completed")


@dataclass
class Observer:
    """Where a conversation reports what the ingress measures (metrics live in the ingress replica)."""

    turn_latency: Callable[[float], None] = lambda s: None  # end of turn → first audio delta
    first_audio: Callable[[float], None] = lambda s: None  # response start → first audio delta
    error: Callable[[str], None] = lambda code: None
    prompt_rows: Callable[[list[PromptUse]], None] = lambda uses: None  # per reply: each sentence's prompt


@dataclass(frozen=True)
class ReplyPrompt:
    """What a reply speaks from; known once the turn it answers is in the history."""

    instructions: str  # the session's (or this response's) instructions, then the system notes
    messages: list[dict[str, str]]  # the history as the responder reads it: role and text, oldest first
    context: list[Segment]  # CSM's context before this reply (the voice's reference first, if any)
    voice: str | None  # the voice whose reference is pinned first in `context`; None: no reference


class Reply:
    """One response. `run` is its task's body; `stop` ends it early, once."""

    def __init__(
        self,
        response: p.RealtimeResponse,
        sampling: p.Sampling,
        max_frames: int,
        services: Services,
        send: Callable[[p.ServerEvent], None],
        observe: Observer,
    ) -> None:
        self.response = response
        self.item_id = p.new_id("item")
        self.task: asyncio.Task | None = None
        self.cancel_reason: str = "client_cancelled"
        self.audio_samples = 0
        self._sampling = sampling
        self._max_frames = max_frames
        self._services = services
        self._send = send
        self._observe = observe

    def stop(self, reason: str | None = None) -> None:
        """Cancel the reply's task, once. A second cancel would land in the task's cleanup (closing its
        decoder stream, remembering the heard turn, sending `response.done`) and cut that short: a
        barge-in followed by the page's truncate lost the turn, so the truncate found no item."""
        if self.task is None or self.task.done() or self.task.cancelling():
            return
        if reason is not None:
            self.cancel_reason = reason
        self.task.cancel()

    async def run(
        self,
        prompt: Callable[[], Awaitable[ReplyPrompt]],
        remember: Callable[[Turn], Awaitable[None]],
        turn_ended_at: float | None,
    ) -> None:
        """Speak, then finish: `remember` gets the heard turn, if any. `turn_ended_at` (perf_counter) is
        when the turn this reply answers ended, for the turn latency; None when it answers no turn."""
        started = time.perf_counter()
        audio = self._services.reply_audio()
        spoken: list[tuple[str, int]] = []  # each sentence and its frames, as generated
        item = p.Item(id=self.item_id, role="assistant", status="in_progress", content=[p.OutputAudio()])
        for event in p.output_started(self.response.id, item):
            self._send(event)
        try:
            status = await self._speak(await prompt(), audio, spoken, started, turn_ended_at)
        except asyncio.CancelledError:
            status = p.ResponseStatusDetails(type="cancelled", reason=self.cancel_reason)  # type: ignore[arg-type]
        except EngineFull:
            status = self._failed("server_busy", "the server is at capacity; try again shortly")
        except ResponderError as e:
            status = self._failed("response_failed", f"the reply text failed: {e.message}")
        except ValueError as e:
            status = self._failed("response_failed", str(e))
        except Exception as e:  # a replica died mid-reply, ...: this reply fails, the conversation goes on
            log.exception("conversation %s: reply %s failed", self.response.conversation_id, self.response.id)
            status = self._failed("response_failed", f"generating the reply failed ({type(e).__name__})")
        finally:
            await audio.close()
        await self._finish(status, audio, spoken, remember)

    async def _speak(
        self,
        prompt: ReplyPrompt,
        audio: ReplyAudio,
        spoken: list[tuple[str, int]],
        started: float,
        turn_ended_at: float | None,
    ) -> p.ResponseStatusDetails:
        budget = self._max_frames
        sampling = self._sampling
        async for sentence in self._services.reply_text(prompt.instructions, prompt.messages):
            if budget <= 0:
                return p.ResponseStatusDetails(type="incomplete", reason="max_output_tokens")
            self._send(
                p.ResponseOutputAudioTranscriptDelta(
                    response_id=self.response.id,
                    item_id=self.item_id,
                    delta=sentence if not spoken else " " + sentence,
                )
            )
            request = SpeechRequest(
                text=sentence,
                speaker=ASSISTANT,
                # This reply's earlier sentences, so the voice and prosody carry on.
                context=prompt.context + turn_segments(ASSISTANT, sentence_parts(spoken, audio.codes())),
                keep_first=1 if prompt.voice is not None else 0,
                max_frames=min(frames_for(sentence), budget),
                temperature=sampling.temperature,
                top_k=sampling.top_k,
                seed=None if sampling.seed is None else sampling.seed + len(spoken),
                conversation_id=self.response.conversation_id,
                voice=prompt.voice,
            )
            before = len(audio.frames)
            spoken.append((sentence, 0))
            async for chunk in audio.speak(request):
                if self.audio_samples == 0:
                    self._observe.first_audio(time.perf_counter() - started)
                    if turn_ended_at is not None:
                        self._observe.turn_latency(time.perf_counter() - turn_ended_at)
                self._send(
                    p.ResponseOutputAudioDelta(
                        response_id=self.response.id, item_id=self.item_id, delta=p.encode_pcm16(chunk.pcm)
                    )
                )
                self.audio_samples += chunk.pcm.size
            spoken[-1] = (sentence, len(audio.frames) - before)
            budget -= spoken[-1][1]
        return _COMPLETED

    async def _finish(
        self,
        status: p.ResponseStatusDetails,
        audio: ReplyAudio,
        spoken: list[tuple[str, int]],
        remember: Callable[[Turn], Awaitable[None]],
    ) -> None:
        transcript = " ".join(text for text, _ in spoken)
        if spoken:  # a sentence cut short by a barge-in or an error keeps the frames it made
            spoken[-1] = (spoken[-1][0], len(audio.frames) - sum(n for _, n in spoken[:-1]))
            codes = audio.codes()
            now = time.time()
            codes_or_none = codes if codes.size else None
            await remember(
                Turn(self.item_id, "assistant", transcript, codes_or_none, now, now, sentences=spoken)
            )
        if audio.prompts:
            self._observe.prompt_rows(audio.prompts)
        item = p.Item(
            id=self.item_id,
            role="assistant",
            status="completed" if status.type == "completed" else "incomplete",
            content=[p.OutputAudio(transcript=transcript)],
        )
        for event in p.output_done(self.response.id, item, transcript):
            self._send(event)
        usage = p.PromptRows.of([(u.rows, u.reused) for u in audio.prompts]) if audio.prompts else None
        final = self.response.model_copy(
            update={"status": status.type, "status_details": status, "output": [item], "x_prompt": usage}
        )
        self._send(p.ResponseDone(response=final))

    def _failed(self, code: p.ErrorCode, message: str) -> p.ResponseStatusDetails:
        self._observe.error(code)
        self._send(p.ProtocolError(code, message).to_event())
        return p.ResponseStatusDetails(
            type="failed", error=p.ResponseError(type="server_error", code=code, message=message)
        )


def turn_segments(speaker: int, parts: list[tuple[str, np.ndarray | None]]) -> list[Segment]:
    """Context segments of one turn's parts: the same for a reply's sentences while it is spoken and once
    it is in the history, so its rows are the same in both (the engine's cached prefix)."""
    return [Segment(speaker, text.strip() or "...", codes) for text, codes in parts]


def frames_for(sentence: str) -> int:
    """Frames to allow for speaking `sentence`: ~15 characters a second, plus slack; CSM ends a sentence
    earlier with its EOS frame (random weights never do, so this is also the noise's length)."""
    seconds = 0.6 + len(sentence) / 15.0 * 1.3
    return max(12, math.ceil(seconds * 1000 / FRAME_MS))
