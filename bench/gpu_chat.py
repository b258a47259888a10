"""Section 5 of the GPU run (bench/gpu.py), issue 14: multi-turn conversations on one engine with KV reuse
on and off, swept upwards in the number of conversations; the largest whose every reply stays faster
than real time."""

from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file too (`--help`)

from bench.gpu_budget import Sizes
from bench.gpu_engine import MIMI_CODES, build_engine, drain, sampling
from bench.measure import free_memory
from bench.report import StreamedTable, quantile
from csm.audio import FRAME_SECONDS
from csm.codec import NUM_CODEBOOKS
from csm.engine import Engine, EngineFull
from csm.model import CSM
from csm.prompt import PromptBuilder, Segment


@dataclass
class _Reply:
    turn: int
    prompt_rows: int
    added: float
    reused: int = 0
    first: float | None = None
    last: float | None = None
    frames: int = 0

    @property
    def ms_per_frame(self) -> float:
        """Request to last frame, per frame made: a reply is real time when this is at most 80 ms."""
        return (self.last - self.added) / max(self.frames, 1) * 1000


@dataclass
class _Conversation:
    index: int
    key: str
    context: list[Segment]
    start_at: float
    turn: int = 0
    request: str | None = None
    reply_text: str = ""
    codes: list[np.ndarray] = field(default_factory=list)
    done: bool = False


@dataclass
class ChatRun:
    reuse: bool
    conversations: int
    replies: list[_Reply]
    realtime: bool
    reason: str
    wall_s: float
    max_rows: int
    counters: dict[str, int]


def _stat(engine: Engine, name: str) -> int | None:
    # Counters of the prefix-cache engine; None if this engine has no such counter.
    value = getattr(engine.stats, name, None)
    return int(value) if value is not None else None


OUT_OF_TIME = "out of time"


class ChatScenario:
    """C conversations on one engine, each turn the person's (random codes, 2-3 s, and text) then a reply
    of `reply_frames` frames, until the context reaches about `target_rows`. A conversation's next prompt
    extends its previous one row for row: the previous context, the reply's frames exactly as the engine
    made them (ids past Mimi's codes included, as csm/prompt.py allows, so the engine's held rows are a
    prefix of the next prompt), the person's new turn, the next reply's text. Every conversation shares
    the voice's reference segment as its first, pinned segment.

    Replies run back to back (the person's speaking time is not waited out: a heavier load than real
    conversations put on the engine, which keeps the sweep inside its time), conversations start staggered
    over one reply so turns do not all begin in the same frame."""

    def __init__(
        self, engine: Engine, builder: PromptBuilder, sizes: Sizes, conversations: int, reuse: bool
    ) -> None:
        self.engine, self.builder, self.sizes = engine, builder, sizes
        self.n, self.reuse = conversations, reuse
        self.rng = np.random.default_rng(conversations)
        voice_codes = self._codes(sizes.voice_frames)
        self.voice = Segment(0, "a calm clear voice", voice_codes)
        self.voice_rows = builder.segment_rows(self.voice)[0].shape[0]

    def _codes(self, frames: int) -> torch.Tensor:
        return torch.from_numpy(self.rng.integers(0, MIMI_CODES, (frames, NUM_CODEBOOKS)))

    def _start_turn(self, conv: _Conversation, now: float) -> _Reply | None:
        """The person's turn and the request for the reply; None once the context is long enough."""
        s = self.sizes
        person = Segment(1, f"turn {conv.turn} ok", self._codes(int(self.rng.integers(*s.person_frames))))
        # Short texts: the byte tokenizer spends one row per byte, the Llama-3 one about one per word.
        reply_text = f"reply {conv.turn} ok"
        context = [*conv.context, person]
        prompt = self.builder.build(context, 0, reply_text, s.reply_frames, keep_first=1)
        if len(prompt) > s.target_rows:
            conv.done = True
            return None
        conv.context, conv.reply_text, conv.codes = context, reply_text, []
        # Reuse off names no key at all, so it is today's engine whatever a prefix-cache engine keeps.
        keys = dict(cache_key=conv.key, prefix_key="voice", prefix_rows=self.voice_rows) if self.reuse else {}
        conv.request = self.engine.add(
            prompt.tokens,
            prompt.mask,
            s.reply_frames,
            sampling(conv.index * 1000 + conv.turn),
            request_id=f"{conv.key}-t{conv.turn}",
            **keys,
        )
        return _Reply(conv.turn, len(prompt), now)

    def _end_turn(self, conv: _Conversation) -> None:
        codes = np.stack(conv.codes) if conv.codes else np.zeros((0, NUM_CODEBOOKS), np.int64)
        conv.context.append(Segment(0, conv.reply_text, torch.from_numpy(codes.astype(np.int64))))
        conv.request, conv.turn = None, conv.turn + 1

    def run(self, deadline: float) -> ChatRun:
        s, engine = self.sizes, self.engine
        before = {k: _stat(engine, k) for k in ("prefilled_rows", "reused_rows", "evictions")}
        stagger = s.reply_frames * FRAME_SECONDS / self.n
        t0 = time.perf_counter()
        convs = [_Conversation(i, f"c{self.n}-{i}", [self.voice], t0 + i * stagger) for i in range(self.n)]
        by_request: dict[str, tuple[_Conversation, _Reply]] = {}
        replies: list[_Reply] = []
        reason = miss = ""
        while not reason and not all(c.done for c in convs):
            now = time.perf_counter()
            if now > deadline:
                reason = OUT_OF_TIME
                break
            for conv in convs:
                if not conv.done and conv.request is None and now >= conv.start_at:
                    try:
                        reply = self._start_turn(conv, now)
                    except EngineFull:
                        reason = "engine full"
                        break
                    if reply is not None:
                        by_request[conv.request] = (conv, reply)
            if not engine.has_work:
                time.sleep(0.001)  # staggered starts still to come
                continue
            events = engine.step()
            now = time.perf_counter()
            for ev in events:
                conv, reply = by_request[ev.request_id]
                if getattr(ev, "reused", None) is not None:
                    reply.reused = ev.reused
                if ev.codes is not None:
                    reply.first = reply.first or now
                    reply.frames += 1
                    conv.codes.append(ev.codes)
                if ev.done:
                    reply.last = now
                    replies.append(reply)
                    del by_request[ev.request_id]
                    self._end_turn(conv)
                    if reply.ms_per_frame > FRAME_SECONDS * 1000 and not miss:
                        miss = f"a reply at turn {reply.turn} took {reply.ms_per_frame:.1f} ms/frame"
                        reason = miss if s.stop_at_miss else ""
        drain(engine, list(by_request))
        counters = {
            k: v - before[k] for k in before if (v := _stat(engine, k)) is not None and before[k] is not None
        }
        max_rows = max((r.prompt_rows for r in replies), default=0)
        wall = time.perf_counter() - t0
        reason = reason or miss
        return ChatRun(self.reuse, self.n, replies, not reason, reason, wall, max_rows, counters)


CHAT_COLUMNS = (
    ("reuse", 5),
    ("conversations", 13),
    ("replies", 7),
    ("context rows (max)", 18),
    ("prefill rows/reply", 18),
    ("reused rows/reply", 17),
    ("first frame mean/p95 ms", 23),
    ("first frame turn 0 -> last", 26),
    ("worst ms/frame", 14),
    ("real time", 9),
    ("wall s", 6),
    ("notes", 0),
)


def chat_cells(run: ChatRun) -> list[str]:
    replies = run.replies
    if not replies:
        return ["on" if run.reuse else "off", str(run.conversations), "0", *["-"] * 6, "no", "-", run.reason]
    prefill = [r.prompt_rows - r.reused for r in replies]  # the engine's counters (in notes) add cancels
    by_turn = [(r.turn, (r.first - r.added) * 1000) for r in replies if r.first is not None]
    ttff = [t for _, t in by_turn]
    last = max((turn for turn, _ in by_turn), default=0)
    turn_mean = lambda k: statistics.mean([t for turn, t in by_turn if turn == k] or [math.nan])  # noqa: E731
    notes = [run.reason] if run.reason else []
    notes += [f"{k} {v}" for k, v in run.counters.items()]
    return [
        "on" if run.reuse else "off",
        str(run.conversations),
        str(len(replies)),
        str(run.max_rows),
        f"{statistics.mean(prefill):.0f}",
        f"{statistics.mean(r.reused for r in replies):.0f}",
        f"{statistics.mean(ttff):.0f} / {quantile(ttff, 95):.0f}" if ttff else "-",
        f"{turn_mean(0):.0f} -> {turn_mean(last):.0f} (turn {last})",
        f"{max(r.ms_per_frame for r in replies):.0f}",
        "yes" if run.realtime else "no",
        f"{run.wall_s:.0f}",
        "; ".join(notes),
    ]


def chat_sweep(model: CSM, builder: PromptBuilder, sizes: Sizes, deadline: float) -> dict[bool, str]:
    """Sweep the number of conversations upwards, reuse on and off side by side, each mode until it fails
    (or the time is out); the largest count that stayed real time, per mode."""
    slots = max(sizes.conversations)
    engines: dict[bool, Engine] = {}
    for reuse in (True, False):
        engines[reuse], note = build_engine(model, slots, sizes.chat_prefill_chunk, prefix_cache=reuse)
        print(f"# conversations, reuse {'on' if reuse else 'off'}: {note}", flush=True)
    print(
        f"# {sizes.reply_frames}-frame replies back to back, person turns of {sizes.person_frames[0]}-"
        f"{sizes.person_frames[1]} frames, a {sizes.voice_frames}-frame voice prefix, until ~"
        f"{sizes.target_rows} rows; prefill chunk {sizes.chat_prefill_chunk}; real time = every reply's "
        "request-to-last-frame time / frames <= 80 ms",
        flush=True,
    )
    table = StreamedTable(CHAT_COLUMNS)
    passed: dict[bool, int | None] = {True: None, False: None}
    failed: dict[bool, int | None] = {True: None, False: None}
    stopped = ""
    for n in sizes.conversations:
        for reuse in (True, False):
            if failed[reuse] is not None or stopped:
                continue
            if deadline - time.perf_counter() < 5:
                stopped = "out of time"
                continue
            scenario = ChatScenario(engines[reuse], builder, sizes, n, reuse)
            run = scenario.run(min(deadline, time.perf_counter() + sizes.run_cap_s))
            table.row(chat_cells(run))
            if run.realtime:
                passed[reuse] = n
            elif run.reason == OUT_OF_TIME:  # unknown, not a failure
                stopped = OUT_OF_TIME
            else:
                failed[reuse] = n
        if stopped or all(f is not None for f in failed.values()):
            break
    engines.clear()
    free_memory()
    return {reuse: _largest(passed[reuse], failed[reuse], stopped) for reuse in (True, False)}


def _largest(passed: int | None, failed: int | None, stopped: str) -> str:
    """The largest count that passed, and why the sweep went no further."""
    why = f"{failed} failed" if failed is not None else stopped or "the largest tried"
    return f"{passed if passed is not None else 'none'} ({why})"
