"""The continuous-batching generation engine: many sequences, one batched forward per 80 ms frame.

Each sequence owns a slot: a row of the static backbone KV cache and of every per-slot buffer. Sequences
join and leave between frames. A joining sequence's prompt is prefilled in chunks (one chunked step per
engine iteration, shared by the joiners at the head of the queue), so it never stalls the others for more
than one chunk; its last prompt row is left for the batched frame step, which produces its first frame
together with everyone else's.

A frame step is one backbone step for the whole batch, then 31 dependent depth-decoder steps. Rows are
slots `[0, b)`; inactive rows write their keys into a scratch column no mask exposes and leave every
other buffer unchanged, so an inactive slot behaves as if its step never happened. On CUDA the frame
step is captured as CUDA graphs keyed by (batch bucket, KV-length bucket), all captured up front in
`setup()`; on CPU it runs eagerly with exact sizes, its weights prepacked for oneDNN (`CSM.pack_cpu`).

Nothing is prefilled twice. A sequence that ends (EOS, max frames, cancel) and names a `cache_key` (its
conversation) leaves its slot *parked*: the KV stays, with the exact rows it holds (prompt rows, then the
frames fed back). The key's next request reuses the longest common prefix of rows and prefills only the
rest, so a conversation's reply costs its new rows, not its whole history. Parked slots are evicted least
recently used when a slot is needed (to a host-memory tier when it has a budget, whence they are copied
back instead of re-prefilled); a request is refused only when every slot runs a sequence. A request may
also name a shared prefix (a voice's reference segment): the first request that prefills it leaves a copy
of those rows' KV, and later ones, from any conversation, copy it instead of prefilling it. Matches are
exact (token and mask equality), so reuse never changes what a prompt means.

Active sequences always sit in slots `[0, n_active)`: a frame step computes every slot below the highest
active one, so an activating sequence moves down into the lowest non-active slot, and a finishing one is
swapped with the highest active one (device copies between frames, never inside a captured graph).

Thread safety: `add` and `cancel` may be called from any thread (they only queue host tensors); `step`
from one thread only, which does every device copy.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from csm.host import to_host
from csm.model import CSM, CacheView
from csm.presets import ModelArgs
from csm.sampling import MAX_TOP_K, TEMPERATURE, TOP_K, Mode, NoiseTables, sample, sampling_inputs, seed_key

log = logging.getLogger(__name__)

_RECENT = 4096  # frame steps kept in `Engine.stats` for metrics


class EngineFull(RuntimeError):
    """Every slot runs a sequence; the caller should refuse the request (server busy)."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = TEMPERATURE  # 0 = greedy
    top_k: int = TOP_K
    seed: int | None = None  # None: a random seed, fixed for the request

    def validated(self, vocab: int) -> SamplingParams:
        if not (self.temperature >= 0 and self.temperature < float("inf")):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        top = min(vocab, MAX_TOP_K)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not 1 <= self.top_k <= top:
            raise ValueError(f"top_k must be an integer in [1, {top}], got {self.top_k!r}")
        seed = self.seed if self.seed is not None else secrets.randbits(62)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**62:
            raise ValueError(f"seed must be an integer in [0, 2**62), got {self.seed!r}")
        return SamplingParams(float(self.temperature), self.top_k, seed)


@dataclass(frozen=True)
class EngineConfig:
    max_slots: int = 16
    prefill_chunk: int = 256  # prompt rows per prefill step, shared by the joiners it packs
    # A prefill step's width is rounded up to a multiple of this (within prefill_chunk), its padding written
    # to the scratch column. On CPU oneDNN builds and keeps a kernel and a weight layout per matmul shape
    # (~0.6 MB each, up to 1,024 per cache): exact widths, one per prompt length, grew a generator replica
    # by ~20 MB/min for as long as conversations ran; aligned, a step has at most prefill_chunk/16 shapes.
    prefill_align: int = 16
    cuda_graphs: bool | None = None  # None: on when the device is CUDA
    # Frame steps with bucketed shapes (batch: powers of two; KV length: multiples of kv_bucket; top-k over
    # MAX_TOP_K candidates; mixed sampling), as CUDA graphs need; always on with graphs. Without graphs it
    # exists so tests can check that the padded shapes give the same codes as the exact ones.
    static_shapes: bool = False
    kv_bucket: int = 256
    prefix_cache: bool = True  # park finished sequences' KV for their key's next request; share prefixes
    host_cache_bytes: int = 0  # host-memory tier for evicted parked KV (pinned on CUDA); 0: none
    max_shared_prefixes: int = 8  # voice prefixes kept on the device, least recently used dropped
    # CPU only: torch threads for prefill steps, which are large matmuls and attention over the whole
    # context and parallelise (2 threads: 1.85x on a 137-row chunk against 1,500 cached rows, measured),
    # where a frame step is hundreds of small ops that a second thread slows down. None: the process's.
    prefill_threads: int | None = None

    def __post_init__(self) -> None:
        if self.prefill_chunk < 1 or self.prefill_align < 1:
            raise ValueError(f"prefill_chunk and prefill_align must be >= 1, got {self.prefill_chunk}, "
                             f"{self.prefill_align}")  # fmt: skip


def pinned(t: Tensor) -> Tensor:
    """`t` in page-locked host memory, so that its copy to the device can be asynchronous."""
    return t.pin_memory()


def kv_bytes_per_row(args: ModelArgs, dtype: torch.dtype) -> int:
    """Backbone keys and values of one prompt row, every layer (32 KiB at csm-1b in bf16)."""
    b = args.backbone
    return 2 * b.n_layers * b.n_kv_heads * b.head_dim * dtype.itemsize


def slot_bytes(args: ModelArgs, dtype: torch.dtype) -> int:
    """Device memory one slot takes: its full backbone KV row (+ scratch column) and the depth decoder's
    queries, keys and values (see `Transformer.new_span_cache`)."""
    d = args.decoder
    decoder = d.n_layers * (d.n_heads + 2 * d.n_kv_heads) * d.head_dim * (args.num_codebooks + 1)
    return kv_bytes_per_row(args, dtype) * (args.max_seq_len + 1) + decoder * dtype.itemsize


def slots_for_memory(budget_bytes: int, per_slot: int, limit: int = 512) -> int:
    """How many slots fit in `budget_bytes` (at least 1, at most `limit`)."""
    return max(1, min(limit, budget_bytes // max(per_slot, 1)))


@dataclass
class FrameEvent:
    request_id: str
    codes: np.ndarray | None  # [num_codebooks] int64, None when the event only ends the sequence
    done: bool = False
    reason: str | None = None  # "eos" | "max_frames" | "cancelled"
    reused: int | None = None  # prompt rows taken from a cache instead of prefilled (first event only)


@dataclass(eq=False)
class _Sequence:
    request_id: str
    tokens: Tensor  # [T, 33] long, host
    mask: Tensor  # [T, 33] bool, host
    max_frames: int
    sampling: SamplingParams
    cache_key: str | None = None
    prefix_key: str | None = None
    prefix_rows: int = 0
    slot: int = -1  # -1 until the engine thread places it
    prefilled: int = 0  # prompt rows already in the cache
    reused: int = 0  # of those, rows copied from a cache
    steps: int = 0  # frame steps taken (frames made, EOS included)
    frames: list[np.ndarray] = field(default_factory=list)  # non-EOS frames made
    active: bool = False
    reported: bool = False  # `reused` went out with an event

    @property
    def to_prefill(self) -> int:
        # The last prompt row is fed by the first frame step.
        return self.tokens.shape[0] - 1 - self.prefilled

    def held_rows(self) -> int:
        """Rows whose KV the slot holds: the prompt (less its last row until the first frame step), then
        every frame fed back (a step feeds the previous step's frame; the newest is never fed)."""
        return self.tokens.shape[0] - 1 + self.steps if self.active else self.prefilled

    def held(self) -> tuple[Tensor, Tensor]:
        """The rows the slot holds, as prompt rows (a fed frame is an audio row: 32 codes, no text)."""
        n, t = self.held_rows(), self.tokens.shape[0]
        if n <= t:
            return self.tokens[:n], self.mask[:n]
        fed = torch.from_numpy(np.stack(self.frames[: n - t]))
        tokens = torch.zeros(n - t, self.tokens.shape[1], dtype=torch.long)
        tokens[:, :-1] = fed
        mask = torch.ones_like(tokens, dtype=torch.bool)
        mask[:, -1] = False
        return torch.cat([self.tokens, tokens]), torch.cat([self.mask, mask])


@dataclass(eq=False)
class _Cached:
    """Rows whose KV is kept for reuse: in a parked slot, in host memory, or (a shared prefix) on the
    device outside the slots."""

    key: str
    tokens: Tensor  # [n, 33] long, host
    mask: Tensor
    slot: int | None = None  # the parked slot; None when the KV is in `k`/`v`
    k: Tensor | None = None  # [L, Hkv, n, D]
    v: Tensor | None = None

    @property
    def rows(self) -> int:
        return self.tokens.shape[0]

    @property
    def nbytes(self) -> int:
        return 0 if self.k is None else self.k.nbytes + self.v.nbytes

    def common_prefix(self, tokens: Tensor, mask: Tensor) -> int:
        """Leading rows equal in token and mask to `tokens`/`mask` (host tensors)."""
        n = min(self.rows, tokens.shape[0])
        same = (self.tokens[:n] == tokens[:n]).all(1) & (self.mask[:n] == mask[:n]).all(1)
        diff = (~same).nonzero()
        return int(diff[0, 0]) if len(diff) else n


@dataclass
class _SlotState:
    """Per-slot buffers, allocated once with fixed shapes; frame steps update them in place by index."""

    k: Tensor  # backbone KV: [L, S, Hkv, max_seq_len + 1, D]; the last column is scratch
    v: Tensor
    dqkv: Tensor  # depth decoder q|k|v, scratch per frame: [Ld, S, Hd + 2 Hkv_d, num_codebooks + 1, Dd]
    next_input: Tensor  # [S, dim]: the backbone input of each slot's next step
    pos: Tensor  # [S] long: position of that input
    active: Tensor  # [S] bool
    temperature: Tensor  # [S] float
    top_k: Tensor  # [S] long
    key: Tensor  # [S] long: the request's `seed_key`, its seed hashed once
    frame: Tensor  # [S] long: frames made so far (the sampling noise counter)
    codes: Tensor  # [S, num_codebooks] long: the last frame

    def reset(self, mask: Tensor) -> None:
        """Clear the slots in `mask` in place (buffers keep their addresses for captured graphs)."""
        self.active.masked_fill_(mask, False)
        self.pos.masked_fill_(mask, 0)
        self.frame.masked_fill_(mask, 0)

    def swap(self, a: int, b: int, rows: int) -> None:
        """Exchange slots a and b: the first `rows` KV positions and every per-slot buffer, in place."""
        pair, flipped = [a, b], [b, a]
        for cache in (self.k, self.v):  # the gathered right side is a copy, so this is a true swap
            cache[:, pair, :, :rows] = cache[:, flipped, :, :rows]
        for buf in (self.next_input, self.pos, self.active, self.temperature, self.top_k, self.key):
            buf[pair] = buf[flipped]
        self.frame[pair] = self.frame[flipped]
        self.codes[pair] = self.codes[flipped]


@dataclass
class _Stats:
    """Counters since start, and the most recent frame steps (bounded: a server runs for weeks)."""

    frames: int = 0
    frame_steps: int = 0
    prefill_steps: int = 0
    prefilled_rows: int = 0  # prompt rows computed (the last row of each prompt included)
    reused_rows: int = 0  # prompt rows copied from a parked slot, the host tier or a shared prefix
    evictions: int = 0  # parked slots given up for a new sequence
    host_restores: int = 0  # requests whose KV came back from host memory
    shared_prefix_hits: int = 0  # requests that copied a shared prefix
    relocations: int = 0  # slot moves that keep the active rows dense
    batch_sizes: deque[int] = field(default_factory=lambda: deque(maxlen=_RECENT))
    step_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=_RECENT))

    def steps_since(self, frame_steps: int) -> tuple[list[int], list[float]]:
        """Batch sizes and wall times of the frame steps after the first `frame_steps` (those still kept).

        Safe from another thread: the engine thread only appends, and the two deques are read together."""
        sizes, times = list(self.batch_sizes), list(self.step_seconds)
        n = min(self.frame_steps - frame_steps, len(sizes), len(times))
        return sizes[len(sizes) - n :], times[len(times) - n :]


class Engine:
    def __init__(self, model: CSM, config: EngineConfig | None = None) -> None:
        self.model = model.eval()
        self.config = config or EngineConfig()
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.args = model.args
        self.max_seq_len = self.args.max_seq_len
        self._scratch_pos = self.max_seq_len  # the cache column that absorbs writes of inactive rows
        use_graphs = self.config.cuda_graphs
        self.cuda_graphs = (self.device.type == "cuda") if use_graphs is None else use_graphs
        self.static_shapes = self.cuda_graphs or self.config.static_shapes
        self._pin = self.device.type == "cuda"
        self._k_max = min(MAX_TOP_K, self.args.audio_vocab_size)  # candidates per draw in a static frame
        self._lock = threading.Lock()
        self._seqs: dict[str, _Sequence] = {}  # every sequence not yet finished: pending, prefilling, active
        self._pending: deque[_Sequence] = deque()  # added, not yet placed in a slot
        self._prefill_queue: deque[_Sequence] = deque()
        self._cancelled: set[str] = set()
        # Engine thread only:
        self._owner: list[_Sequence | _Cached | None] = [None] * self.config.max_slots
        self._parked: OrderedDict[str, _Cached] = OrderedDict()  # by key, least recently used first
        self._host: OrderedDict[str, _Cached] = OrderedDict()
        self._shared: OrderedDict[str, _Cached] = OrderedDict()
        self.host_bytes = 0
        self._state: _SlotState | None = None
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.stats = _Stats()

    # ---- setup -------------------------------------------------------------------------------------
    def setup(self) -> Engine:
        """Allocate every per-slot buffer (and capture CUDA graphs). Idempotent."""
        if self._state is not None:
            return self
        s, m, dev = self.config.max_slots, self.model, self.device
        if dev.type == "cpu":
            m.pack_cpu()
        m.project_audio()
        k, v = m.backbone.new_cache(s, self.max_seq_len + 1, dev, self.dtype)
        self._state = _SlotState(
            k=k,
            v=v,
            dqkv=m.decoder.new_span_cache(s, self.args.num_codebooks + 1, dev, self.dtype),
            next_input=torch.zeros(s, self.args.backbone.dim, device=dev, dtype=self.dtype),
            pos=torch.zeros(s, dtype=torch.long, device=dev),
            active=torch.zeros(s, dtype=torch.bool, device=dev),
            temperature=torch.zeros(s, device=dev),
            top_k=torch.ones(s, dtype=torch.long, device=dev),
            key=torch.zeros(s, dtype=torch.long, device=dev),
            frame=torch.zeros(s, dtype=torch.long, device=dev),
            codes=torch.zeros(s, self.args.num_codebooks, dtype=torch.long, device=dev),
        )
        # The depth decoder's positions are the same every frame: pass 1 covers 0..1, pass i covers i.
        dec = self.model.decoder
        self._decoder_rope = [None, dec.span_rope(0, 2, self.dtype)] + [
            dec.span_rope(i, 1, self.dtype) for i in range(2, self.args.num_codebooks)
        ]
        self._positions = torch.arange(self.max_seq_len, device=dev)
        self._noise = NoiseTables.make(dev)
        if self.cuda_graphs:
            self._capture_graphs()
        return self

    def _batch_buckets(self) -> list[int]:
        sizes, b = [], 1
        while b < self.config.max_slots:
            sizes.append(b)
            b *= 2
        return [*sizes, self.config.max_slots]

    def _kv_buckets(self) -> list[int]:
        step = self.config.kv_bucket
        return sorted({min(n, self.max_seq_len) for n in range(step, self.max_seq_len + step, step)})

    def _capture_graphs(self) -> None:
        # Every slot is inactive now, so warm-up runs leave no trace (see the module docstring).
        pool = torch.cuda.graph_pool_handle()
        k_max = self._k_max
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.inference_mode(), torch.cuda.stream(stream):
            for b in self._batch_buckets():
                for kv in self._kv_buckets():
                    self._frame(b, kv, k_max)
        torch.cuda.current_stream().wait_stream(stream)
        with torch.inference_mode():
            for b in reversed(self._batch_buckets()):
                for kv in reversed(self._kv_buckets()):
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g, pool=pool):
                        self._frame(b, kv, k_max)
                    self._graphs[(b, kv)] = g
        torch.cuda.synchronize()
        log.info("captured %d CUDA graphs for the frame step", len(self._graphs))

    # ---- requests ----------------------------------------------------------------------------------
    def add(
        self,
        tokens: Tensor,
        mask: Tensor,
        max_frames: int,
        sampling: SamplingParams | None = None,
        request_id: str | None = None,
        cache_key: str | None = None,
        prefix_key: str | None = None,
        prefix_rows: int = 0,
    ) -> str:
        """Queue a prompt ([T, 33] tokens and mask) for generation. Raises EngineFull when every slot runs
        a sequence (parked slots do not count: they are evicted for newcomers).

        `cache_key` (a conversation) reuses what that key's last sequence left; `prefix_key` names the
        first `prefix_rows` rows as a prefix shared across keys (a voice's reference segment)."""
        sampling = (sampling or SamplingParams()).validated(self.args.audio_vocab_size)
        tokens, mask = self._check_prompt(tokens, mask, max_frames)
        if isinstance(prefix_rows, bool) or not isinstance(prefix_rows, int) or prefix_rows < 0:
            raise ValueError(f"prefix_rows must be an integer >= 0, got {prefix_rows!r}")
        request_id = request_id or uuid.uuid4().hex
        seq = _Sequence(
            request_id,
            tokens,
            mask,
            max_frames,
            sampling,
            cache_key,
            prefix_key,
            min(prefix_rows, len(tokens)),
        )
        with self._lock:
            if request_id in self._seqs:
                raise ValueError(f"request id {request_id!r} is already running")
            if len(self._seqs) >= self.config.max_slots:
                raise EngineFull(f"all {self.config.max_slots} generation slots are busy")
            self._seqs[request_id] = seq
            self._pending.append(seq)
        return request_id

    def cancel(self, request_id: str) -> bool:
        """Stop a sequence; its slot is free after the current step. False if it is not running."""
        with self._lock:
            if request_id not in self._seqs:
                return False
            self._cancelled.add(request_id)
            return True

    def _check_prompt(self, tokens: Tensor, mask: Tensor, max_frames: int) -> tuple[Tensor, Tensor]:
        width = self.args.num_codebooks + 1
        if isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1:
            raise ValueError(f"max_frames must be a positive integer, got {max_frames!r}")
        if tokens.ndim != 2 or tokens.shape[1] != width or tokens.shape != mask.shape:
            raise ValueError(f"prompt tokens and mask must both be [rows, {width}]")
        if tokens.shape[0] < 1:
            raise ValueError("prompt is empty")
        if tokens.shape[0] + max_frames > self.max_seq_len:
            raise ValueError(
                f"prompt of {tokens.shape[0]} rows + {max_frames} frames exceeds {self.max_seq_len} positions"
            )
        text, audio = tokens[:, -1], tokens[:, :-1]
        if text.min() < 0 or text.max() >= self.args.text_vocab_size:
            raise ValueError("prompt text token out of the model's vocabulary")
        if audio.min() < 0 or audio.max() >= self.args.audio_vocab_size:
            raise ValueError("prompt audio code out of range")
        # Kept on the host: prefix matching compares there, and the engine thread copies to the device.
        return tokens.to("cpu", torch.long), mask.to("cpu", torch.bool)

    @property
    def n_graphs(self) -> int:
        return len(self._graphs)

    @property
    def n_running(self) -> int:
        with self._lock:
            return len(self._seqs)

    @property
    def n_parked(self) -> int:
        return len(self._parked)

    @property
    def n_host(self) -> int:
        return len(self._host)

    @property
    def n_active(self) -> int:
        return sum(isinstance(o, _Sequence) and o.active for o in self._owner)

    @property
    def bucket(self) -> int:
        """Slots the next frame step computes: one past the highest active slot."""
        return max(
            (i + 1 for i, o in enumerate(self._owner) if isinstance(o, _Sequence) and o.active), default=0
        )

    @property
    def has_work(self) -> bool:
        with self._lock:
            return bool(self._seqs)

    # ---- the loop body -----------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[FrameEvent]:
        """One iteration: apply cancels, place new sequences, run one prefill chunk, run one frame."""
        self.setup()
        events = self._apply_cancels()
        self._admit()
        with self._lock:
            group = self._next_prefill_group()
        if group:
            with self._prefill_threads():
                self._prefill(group)
        active = [s for s in self._owner if isinstance(s, _Sequence) and s.active]
        if active:
            events += self._decode(active)
        return events

    @contextlib.contextmanager
    def _prefill_threads(self) -> Iterator[None]:
        threads = self.config.prefill_threads
        if threads is None or self.device.type != "cpu":
            yield
            return
        frame_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(frame_threads)

    def _apply_cancels(self) -> list[FrameEvent]:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            seqs = [self._seqs[r] for r in cancelled if r in self._seqs]
            for seq in seqs:
                if seq in self._prefill_queue:
                    self._prefill_queue.remove(seq)
                if seq in self._pending:
                    self._pending.remove(seq)
        for seq in seqs:
            self._finish(seq)
        return [self._event(s, None, done=True, reason="cancelled") for s in seqs]

    def _event(self, seq: _Sequence, codes: np.ndarray | None, **kw) -> FrameEvent:
        ev = FrameEvent(seq.request_id, codes, **kw, reused=None if seq.reported else seq.reused)
        seq.reported = True
        return ev

    # ---- slots and caches --------------------------------------------------------------------------
    def _admit(self) -> None:
        """Place each new sequence in a slot with the longest cached prefix of its prompt."""
        while True:
            with self._lock:
                if not self._pending:
                    return
                seq = self._pending.popleft()
            self._place(seq)
            with self._lock:
                self._prefill_queue.append(seq)

    def _place(self, seq: _Sequence) -> None:
        limit = seq.tokens.shape[0] - 1  # the last prompt row is always computed by the frame step
        own = None
        if seq.cache_key is not None:
            own = self._parked.pop(seq.cache_key, None) or self._pop_host(seq.cache_key)
        shared = self._shared.get(seq.prefix_key) if seq.prefix_key is not None else None
        n_own = min(own.common_prefix(seq.tokens, seq.mask), limit) if own is not None else 0
        n_shared = 0
        if shared is not None:
            n_shared = min(shared.common_prefix(seq.tokens, seq.mask), seq.prefix_rows, limit)
            self._shared.move_to_end(seq.prefix_key)
        if own is not None and own.slot is not None and n_own >= n_shared:
            seq.slot, n = own.slot, n_own  # reuse in place: the slot is already ours
        else:
            if own is not None and own.slot is not None:
                self._owner[own.slot] = None  # a shared prefix matches more than our own parked rows
            seq.slot = self._take_slot()
            src = own if n_own >= n_shared else shared
            n = max(n_own, n_shared)
            if n > 0:
                self._restore(src, seq.slot, n)
                if src is own:
                    self.stats.host_restores += 1
                else:
                    self.stats.shared_prefix_hits += 1
        self._owner[seq.slot] = seq
        seq.prefilled = seq.reused = n
        self.stats.reused_rows += n
        self.stats.prefilled_rows += seq.tokens.shape[0] - n

    def _pop_host(self, key: str) -> _Cached | None:
        cached = self._host.pop(key, None)
        if cached is not None:
            self.host_bytes -= cached.nbytes
        return cached

    def _take_slot(self) -> int:
        """The lowest free slot, or the least recently parked one's (moved to the host tier if it fits)."""
        for i, owner in enumerate(self._owner):
            if owner is None:
                return i
        if not self._parked:  # admission counts running sequences, so a parked slot exists
            raise RuntimeError("no slot to place a sequence in")
        _, victim = self._parked.popitem(last=False)
        slot = victim.slot
        self.stats.evictions += 1
        self._to_host(victim)
        self._owner[slot] = None
        return slot

    def _to_host(self, cached: _Cached) -> None:
        budget = self.config.host_cache_bytes
        st, n = self._state, cached.rows
        need = n * kv_bytes_per_row(self.args, self.dtype)
        if need > budget:
            return
        while self._host and self.host_bytes + need > budget:
            _, old = self._host.popitem(last=False)
            self.host_bytes -= old.nbytes
        # Stream-ordered: the copy is done before any later kernel reuses the slot or reads it back.
        k = torch.empty(st.k[:, 0, :, :n].shape, dtype=self.dtype, pin_memory=self._pin)
        v = torch.empty(k.shape, dtype=self.dtype, pin_memory=self._pin)
        k.copy_(st.k[:, cached.slot, :, :n], non_blocking=self._pin)
        v.copy_(st.v[:, cached.slot, :, :n], non_blocking=self._pin)
        cached.slot, cached.k, cached.v = None, k, v
        self._host[cached.key] = cached
        self.host_bytes += cached.nbytes

    def _restore(self, src: _Cached, slot: int, n: int) -> None:
        """Copy the first n rows' KV kept outside the slots (host tier, shared prefix) into `slot` (a
        parked slot is never copied from: its own key reuses it in place)."""
        st = self._state
        st.k[:, slot, :, :n].copy_(src.k[:, :, :n], non_blocking=self._pin)
        st.v[:, slot, :, :n].copy_(src.v[:, :, :n], non_blocking=self._pin)

    def _keep_shared_prefix(self, seq: _Sequence) -> None:
        """Copy the sequence's shared-prefix rows out of its slot, unless the same rows are kept already."""
        key, n = seq.prefix_key, min(seq.prefix_rows, seq.prefilled)
        if key is None or n == 0 or not self.config.prefix_cache or self.config.max_shared_prefixes == 0:
            return
        have = self._shared.get(key)
        tokens, mask = seq.tokens[:n], seq.mask[:n]
        if have is not None and have.rows == n and have.common_prefix(tokens, mask) == n:
            return
        st = self._state
        k, v = st.k[:, seq.slot, :, :n].clone(), st.v[:, seq.slot, :, :n].clone()
        self._shared[key] = _Cached(key, tokens.clone(), mask.clone(), k=k, v=v)
        self._shared.move_to_end(key)
        while len(self._shared) > self.config.max_shared_prefixes:
            self._shared.popitem(last=False)

    def _rows_in(self, slot: int) -> int:
        owner = self._owner[slot]
        if isinstance(owner, _Sequence):
            return owner.held_rows()
        return owner.rows if isinstance(owner, _Cached) else 0

    def _move(self, a: int, b: int) -> None:
        """Swap what slots a and b hold (sequences, parked rows or nothing), device state included."""
        rows = max(self._rows_in(a), self._rows_in(b))
        self._state.swap(a, b, rows)
        self._owner[a], self._owner[b] = self._owner[b], self._owner[a]
        for i in (a, b):
            owner = self._owner[i]
            if owner is not None:
                owner.slot = i
        self.stats.relocations += 1

    def _finish(self, seq: _Sequence) -> None:
        with self._lock:
            self._seqs.pop(seq.request_id, None)
        if seq.slot < 0:  # cancelled before it had a slot
            return
        i, was_active = seq.slot, seq.active
        park = self.config.prefix_cache and seq.cache_key is not None and seq.held_rows() > 0
        tokens, mask = seq.held() if park else (None, None)
        self._state.reset(torch.arange(self.config.max_slots, device=self.device) == i)
        seq.active = False
        if park:
            old = self._parked.pop(seq.cache_key, None)
            if old is not None and old.slot is not None:
                self._owner[old.slot] = None
            self._pop_host(seq.cache_key)
            cached = _Cached(seq.cache_key, tokens, mask, slot=i)
            self._owner[i] = cached
            self._parked[seq.cache_key] = cached
        else:
            self._owner[i] = None
        top = self.bucket - 1
        if was_active and top > i:  # keep the active rows dense: the highest active comes down
            self._move(i, top)

    def _next_prefill_group(self) -> list[tuple[_Sequence, int]]:
        """Joiners at the head of the queue, packed into one prefill step of at most `prefill_chunk` rows.

        The head's next chunk sets the width; later joiners ride along while rows x width fits the budget.
        """
        if not self._prefill_queue:
            return []
        budget = self.config.prefill_chunk
        head = self._prefill_queue[0]
        width = min(head.to_prefill, budget)
        group = [(head, width)]
        if width == 0:
            return group
        for seq in list(self._prefill_queue)[1:]:
            if (len(group) + 1) * self._prefill_width(width) > budget:
                break
            group.append((seq, min(seq.to_prefill, width)))
        return group

    def _prefill_width(self, rows: int) -> int:
        """The columns a prefill step computes for `rows` prompt rows: aligned up, within the chunk."""
        align = self.config.prefill_align
        return min(-(-rows // align) * align, self.config.prefill_chunk)

    def _to_device(self, t: Tensor) -> Tensor:
        """A host tensor on the device without a synchronous copy (pinned and non-blocking on CUDA)."""
        if self.device.type == "cpu":
            return t
        return pinned(t).to(self.device, non_blocking=True)

    def _prefill(self, group: list[tuple[_Sequence, int]]) -> None:
        m, st = self.model, self._state
        work = [(s, n) for s, n in group if n > 0]
        if work:
            # Every index is built on the host and copied once: no synchronous host-to-device copies.
            c = self._prefill_width(max(n for _, n in work))
            rows = len(work)
            tokens = torch.zeros(rows, c, self.args.num_codebooks + 1, dtype=torch.long)
            mask = torch.zeros_like(tokens, dtype=torch.bool)
            for i, (s, n) in enumerate(work):
                tokens[i, :n] = s.tokens[s.prefilled : s.prefilled + n]
                mask[i, :n] = s.mask[s.prefilled : s.prefilled + n]
            starts = torch.tensor([s.prefilled for s, _ in work])
            lens = torch.tensor([n for _, n in work])
            j = torch.arange(c)
            positions = starts[:, None] + j  # [rows, c]
            write = torch.where(j < lens[:, None], positions, self._scratch_pos)
            kv_len = max(s.prefilled + n for s, n in work)
            attn_mask = (torch.arange(kv_len) <= positions[:, :, None])[:, None]
            slots = torch.tensor([s.slot for s, _ in work])
            tokens, mask, positions, write, attn_mask, slots = map(
                self._to_device, (tokens, mask, positions, write, attn_mask, slots)
            )
            x = m.embed_rows(tokens, mask).to(self.dtype)
            m.backbone.fill_cache(
                x,
                m.backbone.rope_at(positions.clamp(max=self.max_seq_len - 1), self.dtype),
                st.k,
                st.v,
                CacheView(slots, write, kv_len, attn_mask),
            )
            self.stats.prefill_steps += 1
        for s, n in group:
            s.prefilled += n
        for s, _ in group:  # after every count is current: an activation may move another joiner's rows
            if s.to_prefill == 0:
                self._activate(s)

    def _activate(self, seq: _Sequence) -> None:
        self._keep_shared_prefix(seq)
        low = next(i for i, o in enumerate(self._owner) if not (isinstance(o, _Sequence) and o.active))
        if low < seq.slot:  # move down so that the active rows stay [0, n_active)
            self._move(low, seq.slot)
        st, i, sp = self._state, seq.slot, seq.sampling
        last = seq.tokens.shape[0] - 1
        row_tokens, row_mask = self._to_device(seq.tokens[last]), self._to_device(seq.mask[last])
        st.next_input[i] = self.model.embed_rows(row_tokens, row_mask).to(self.dtype)
        # Scalars as kernel arguments (`fill_`): no host tensor, no copy to wait for.
        st.pos[i].fill_(last)
        st.frame[i].fill_(0)
        st.temperature[i].fill_(sp.temperature)
        st.top_k[i].fill_(sp.top_k)
        st.key[i].fill_(seed_key(sp.seed))  # hashed on the host: a Python int
        st.active[i].fill_(True)
        seq.active = True
        with self._lock:
            self._prefill_queue.remove(seq)

    def _decode(self, active: list[_Sequence]) -> list[FrameEvent]:
        start = time.perf_counter()
        hi = self.bucket
        kv_len = max(s.tokens.shape[0] + s.steps for s in active)  # positions [0, pos] of every row
        if self.static_shapes:
            b = next(x for x in self._batch_buckets() if x >= hi)
            kv = next(x for x in self._kv_buckets() if x >= kv_len)
            graph = self._graphs.get((b, kv))
            if graph is not None:
                graph.replay()
            else:
                self._frame(b, kv, self._k_max, "mixed")
        else:
            greedy = [s.sampling.temperature == 0 for s in active]
            mode: Mode = "greedy" if all(greedy) else "sample" if not any(greedy) else "mixed"
            self._frame(hi, kv_len, max(s.sampling.top_k for s in active), mode)
        codes = to_host(self._state.codes[:hi])  # the one host sync per frame
        self.stats.frame_steps += 1
        self.stats.batch_sizes.append(len(active))
        self.stats.step_seconds.append(time.perf_counter() - start)
        eos = ~codes.any(axis=1)  # an all-zero frame is EOS
        events, done = [], []
        for seq in active:  # read every row before a finish moves slots
            seq.steps += 1
            if eos[seq.slot]:
                events.append(self._event(seq, None, done=True, reason="eos"))
                done.append(seq)
                continue
            frame = codes[seq.slot].copy()
            seq.frames.append(frame)
            self.stats.frames += 1
            ended = len(seq.frames) >= seq.max_frames
            events.append(self._event(seq, frame, done=ended, reason="max_frames" if ended else None))
            if ended:
                done.append(seq)
        for seq in sorted(done, key=lambda s: -s.slot):  # highest first: fewer moves to stay dense
            self._finish(seq)
        return events

    def _frame(self, b: int, kv_len: int, k_max: int, mode: Mode = "mixed") -> None:
        """One frame for slots [0, b): every tensor op, no host sync (the body of a CUDA graph)."""
        m, st, n_cb = self.model, self._state, self.args.num_codebooks
        pos, active = st.pos[:b], st.active[:b]
        draws = sampling_inputs(
            st.temperature[:b], st.top_k[:b], st.key[:b], st.frame[:b] * n_cb, n_cb, k_max, mode, self._noise
        )
        write = torch.where(active, pos, self._scratch_pos)[:, None]
        attn_mask = (self._positions[:kv_len] <= pos[:, None])[:, None, None, :]
        h = m.backbone(
            st.next_input[:b, None],
            m.backbone.rope_at(pos.clamp(max=self.max_seq_len - 1)[:, None], self.dtype),
            st.k,
            st.v,
            CacheView(slice(0, b), write, kv_len, attn_mask),
        )[:, 0]
        c = sample(m.codebook0_head(h), draws, 0)
        codes = [c]
        x = torch.stack([m.projection(h), m.decoder_input(0, c)], dim=1)  # [b, 2, decoder dim]
        for i in range(1, n_cb):
            # Pass i writes position 0..1 (i = 1) or i, and reads [0, i + 1); every row at the same place.
            out = m.decoder.forward_span(
                x, self._decoder_rope[i], st.dqkv, CacheView(slice(0, b), 0 if i == 1 else i, i + 1, None)
            )
            c = sample(m.codebook_logits(i, out[:, -1]), draws, i)
            codes.append(c)
            if i < n_cb - 1:
                x = m.decoder_input(i, c)[:, None]
        frame = torch.stack(codes, dim=1, out=st.codes[:b])
        # In place, each one op (`buf[:b] += x` would also copy the slice onto itself).
        torch.where(active[:, None], m.embed_frame(frame), st.next_input[:b], out=st.next_input[:b])
        st.pos[:b].add_(active)
        st.frame[:b].add_(active)

    # ---- convenience -------------------------------------------------------------------------------
    def run_to_completion(self) -> dict[str, list[np.ndarray]]:
        """Step until every running sequence is done; frames per request id (tests, benchmarks, CLI)."""
        out: dict[str, list[np.ndarray]] = {}
        while self.has_work:
            for ev in self.step():
                frames = out.setdefault(ev.request_id, [])
                if ev.codes is not None:
                    frames.append(ev.codes)
        return out
