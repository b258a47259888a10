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

Thread safety: `add` and `cancel` may be called from any thread; `step` from one thread only.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from csm.model import CSM, CacheView
from csm.sampling import Mode, sample, sampling_inputs

log = logging.getLogger(__name__)

_RECENT = 4096  # frame steps kept in `Engine.stats` for metrics


class EngineFull(RuntimeError):
    """Every slot is taken; the caller should refuse the request (server busy)."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.9  # 0 = greedy
    top_k: int = 50
    seed: int | None = None  # None: a random seed, fixed for the request

    def validated(self, vocab: int) -> SamplingParams:
        if not (self.temperature >= 0 and self.temperature < float("inf")):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not 1 <= self.top_k <= vocab:
            raise ValueError(f"top_k must be an integer in [1, {vocab}], got {self.top_k!r}")
        seed = self.seed if self.seed is not None else secrets.randbits(62)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**62:
            raise ValueError(f"seed must be an integer in [0, 2**62), got {self.seed!r}")
        return SamplingParams(float(self.temperature), self.top_k, seed)


@dataclass(frozen=True)
class EngineConfig:
    max_slots: int = 16
    prefill_chunk: int = 256  # prompt rows per prefill step, shared by the joiners it packs
    cuda_graphs: bool | None = None  # None: on when the device is CUDA
    # Frame steps with bucketed shapes (batch: powers of two; KV length: multiples of kv_bucket; full-vocab
    # top-k; mixed sampling), as CUDA graphs need; always on with graphs. Without graphs it exists so
    # tests can check that the padded shapes give the same codes as the exact ones.
    static_shapes: bool = False
    kv_bucket: int = 256


@dataclass
class FrameEvent:
    request_id: str
    codes: np.ndarray | None  # [num_codebooks] int64, None when the event only ends the sequence
    done: bool = False
    reason: str | None = None  # "eos" | "max_frames" | "cancelled"


@dataclass(eq=False)
class _Sequence:
    request_id: str
    slot: int
    tokens: Tensor  # [T, 33]
    mask: Tensor
    max_frames: int
    sampling: SamplingParams
    prefilled: int = 0  # prompt rows already in the cache
    frames: int = 0
    active: bool = False

    @property
    def to_prefill(self) -> int:
        # The last prompt row is fed by the first frame step.
        return self.tokens.shape[0] - 1 - self.prefilled


@dataclass
class _SlotState:
    """Per-slot buffers, allocated once with fixed shapes; frame steps update them in place by index."""

    k: Tensor  # backbone KV: [L, S, Hkv, max_seq_len + 1, D]; the last column is scratch
    v: Tensor
    dk: Tensor  # depth decoder KV, scratch per frame: [Ld, S, Hkv, num_codebooks + 1, Dd]
    dv: Tensor
    next_input: Tensor  # [S, dim]: the backbone input of each slot's next step
    pos: Tensor  # [S] long: position of that input
    active: Tensor  # [S] bool
    temperature: Tensor  # [S] float
    top_k: Tensor  # [S] long
    seed: Tensor  # [S] long
    frame: Tensor  # [S] long: frames made so far (the sampling noise counter)
    codes: Tensor  # [S, num_codebooks] long: the last frame

    def reset(self, mask: Tensor) -> None:
        """Clear the slots in `mask` in place (buffers keep their addresses for captured graphs)."""
        self.active.masked_fill_(mask, False)
        self.pos.masked_fill_(mask, 0)
        self.frame.masked_fill_(mask, 0)


@dataclass
class _Stats:
    """Counters since start, and the most recent frame steps (bounded: a server runs for weeks)."""

    frames: int = 0
    frame_steps: int = 0
    prefill_steps: int = 0
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
        self._lock = threading.Lock()
        self._free = list(range(self.config.max_slots))
        self._seqs: dict[str, _Sequence] = {}
        self._prefill_queue: deque[_Sequence] = deque()
        self._cancelled: set[str] = set()
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
        k, v = m.backbone.new_cache(s, self.max_seq_len + 1, dev, self.dtype)
        dk, dv = m.decoder.new_cache(s, self.args.num_codebooks + 1, dev, self.dtype)
        self._state = _SlotState(
            k=k,
            v=v,
            dk=dk,
            dv=dv,
            next_input=torch.zeros(s, self.args.backbone.dim, device=dev, dtype=self.dtype),
            pos=torch.zeros(s, dtype=torch.long, device=dev),
            active=torch.zeros(s, dtype=torch.bool, device=dev),
            temperature=torch.zeros(s, device=dev),
            top_k=torch.ones(s, dtype=torch.long, device=dev),
            seed=torch.zeros(s, dtype=torch.long, device=dev),
            frame=torch.zeros(s, dtype=torch.long, device=dev),
            codes=torch.zeros(s, self.args.num_codebooks, dtype=torch.long, device=dev),
        )
        # The depth decoder's positions are the same every frame: pass 1 covers 0..1, pass i covers i.
        dec = self.model.decoder
        self._decoder_rope = [None, dec.rope_at(torch.arange(2, device=dev)[None], self.dtype)] + [
            dec.rope_at(torch.tensor([[i]], device=dev), self.dtype)
            for i in range(2, self.args.num_codebooks)
        ]
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
        k_max = self.args.audio_vocab_size
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
    ) -> str:
        """Queue a prompt ([T, 33] tokens and mask) for generation. Raises EngineFull past capacity."""
        sampling = (sampling or SamplingParams()).validated(self.args.audio_vocab_size)
        tokens, mask = self._check_prompt(tokens, mask, max_frames)
        request_id = request_id or uuid.uuid4().hex
        with self._lock:
            if request_id in self._seqs:
                raise ValueError(f"request id {request_id!r} is already running")
            if not self._free:
                raise EngineFull(f"all {self.config.max_slots} generation slots are busy")
            self._free.sort()
            slot = self._free.pop(0)  # lowest free slot keeps the active rows dense
            seq = _Sequence(request_id, slot, tokens, mask, max_frames, sampling)
            self._seqs[request_id] = seq
            self._prefill_queue.append(seq)
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
        return tokens.to(self.device, torch.long), mask.to(self.device, torch.bool)

    @property
    def n_graphs(self) -> int:
        return len(self._graphs)

    @property
    def n_running(self) -> int:
        with self._lock:
            return len(self._seqs)

    @property
    def has_work(self) -> bool:
        with self._lock:
            return bool(self._seqs)

    # ---- the loop body -----------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[FrameEvent]:
        """One iteration: apply cancels, run one prefill chunk, run one frame for the active batch."""
        self.setup()
        events = self._apply_cancels()
        with self._lock:
            group = self._next_prefill_group()
        if group:
            self._prefill(group)
        with self._lock:
            active = [s for s in self._seqs.values() if s.active]
        if active:
            events += self._decode(active)
        return events

    def _apply_cancels(self) -> list[FrameEvent]:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            seqs = [self._seqs[r] for r in cancelled if r in self._seqs]
            for seq in seqs:
                if seq in self._prefill_queue:
                    self._prefill_queue.remove(seq)
        for seq in seqs:
            self._finish(seq)
        return [FrameEvent(s.request_id, None, done=True, reason="cancelled") for s in seqs]

    def _finish(self, seq: _Sequence) -> None:
        st = self._state
        st.reset(torch.arange(self.config.max_slots, device=self.device) == seq.slot)
        with self._lock:
            self._seqs.pop(seq.request_id, None)
            self._free.append(seq.slot)

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
            if (len(group) + 1) * width > budget:
                break
            group.append((seq, min(seq.to_prefill, width)))
        return group

    def _prefill(self, group: list[tuple[_Sequence, int]]) -> None:
        m, st, dev = self.model, self._state, self.device
        work = [(s, n) for s, n in group if n > 0]
        if work:
            c = max(n for _, n in work)
            rows = len(work)
            tokens = torch.zeros(rows, c, self.args.num_codebooks + 1, dtype=torch.long, device=dev)
            mask = torch.zeros_like(tokens, dtype=torch.bool)
            for i, (s, n) in enumerate(work):
                tokens[i, :n] = s.tokens[s.prefilled : s.prefilled + n]
                mask[i, :n] = s.mask[s.prefilled : s.prefilled + n]
            starts = torch.tensor([s.prefilled for s, _ in work], device=dev)
            lens = torch.tensor([n for _, n in work], device=dev)
            j = torch.arange(c, device=dev)
            positions = starts[:, None] + j  # [rows, c]
            write = torch.where(j < lens[:, None], positions, self._scratch_pos)
            kv_len = max(s.prefilled + n for s, n in work)
            attn_mask = (torch.arange(kv_len, device=dev) <= positions[:, :, None])[:, None]
            slots = torch.tensor([s.slot for s, _ in work], device=dev)
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
            if s.to_prefill == 0:
                self._activate(s)

    def _activate(self, seq: _Sequence) -> None:
        st, i, sp = self._state, seq.slot, seq.sampling
        last = seq.tokens.shape[0] - 1
        st.next_input[i] = self.model.embed_rows(seq.tokens[last], seq.mask[last]).to(self.dtype)
        st.pos[i] = last
        st.frame[i] = 0
        st.temperature[i] = sp.temperature
        st.top_k[i] = sp.top_k
        st.seed[i] = sp.seed
        st.active[i] = True
        seq.active = True
        with self._lock:
            self._prefill_queue.remove(seq)

    def _decode(self, active: list[_Sequence]) -> list[FrameEvent]:
        start = time.perf_counter()
        hi = max(s.slot for s in active) + 1
        kv_len = max(s.tokens.shape[0] + s.frames for s in active)  # positions [0, pos] of every row
        if self.static_shapes:
            b = next(x for x in self._batch_buckets() if x >= hi)
            kv = next(x for x in self._kv_buckets() if x >= kv_len)
            graph = self._graphs.get((b, kv))
            if graph is not None:
                graph.replay()
            else:
                self._frame(b, kv, self.args.audio_vocab_size, "mixed")
        else:
            greedy = [s.sampling.temperature == 0 for s in active]
            mode: Mode = "greedy" if all(greedy) else "sample" if not any(greedy) else "mixed"
            self._frame(hi, kv_len, max(s.sampling.top_k for s in active), mode)
        codes = self._state.codes[:hi].cpu().numpy()  # the one host sync per frame
        self.stats.frame_steps += 1
        self.stats.batch_sizes.append(len(active))
        self.stats.step_seconds.append(time.perf_counter() - start)
        events = []
        for seq in active:
            frame = codes[seq.slot].copy()
            if not frame.any():  # an all-zero frame is EOS
                events.append(FrameEvent(seq.request_id, None, done=True, reason="eos"))
                self._finish(seq)
                continue
            seq.frames += 1
            self.stats.frames += 1
            done = seq.frames >= seq.max_frames
            events.append(FrameEvent(seq.request_id, frame, done=done, reason="max_frames" if done else None))
            if done:
                self._finish(seq)
        return events

    def _frame(self, b: int, kv_len: int, k_max: int, mode: Mode = "mixed") -> None:
        """One frame for slots [0, b): every tensor op, no host sync (the body of a CUDA graph)."""
        m, st, n_cb = self.model, self._state, self.args.num_codebooks
        pos, active = st.pos[:b], st.active[:b]
        draws = sampling_inputs(
            st.temperature[:b], st.top_k[:b], st.seed[:b], st.frame[:b] * n_cb, n_cb, k_max, mode
        )
        write = torch.where(active, pos, self._scratch_pos)[:, None]
        attn_mask = (torch.arange(kv_len, device=self.device)[None, :] <= pos[:, None])[:, None, None, :]
        h = m.backbone(
            st.next_input[:b, None],
            m.backbone.rope_at(pos.clamp(max=self.max_seq_len - 1)[:, None], self.dtype),
            st.k,
            st.v,
            CacheView(slice(0, b), write, kv_len, attn_mask),
        )[:, 0]
        c = sample(m.codebook0_head(h), draws, 0)
        codes = [c]
        x = m.projection(torch.stack([h, m.embed_audio(0, c)], dim=1))  # [b, 2, decoder dim]
        for i in range(1, n_cb):
            # Pass i writes position 0..1 (i = 1) or i, and reads [0, i + 1); every row at the same place.
            out = m.decoder(
                x,
                self._decoder_rope[i],
                st.dk,
                st.dv,
                CacheView(slice(0, b), 0 if i == 1 else i, i + 1, None),
            )
            c = sample(m.codebook_logits(i, out[:, -1]), draws, i)
            codes.append(c)
            if i < n_cb - 1:
                x = m.projection(m.embed_audio(i, c))[:, None]
        frame = torch.stack(codes, dim=1)
        st.codes[:b] = frame
        st.next_input[:b] = torch.where(active[:, None], m.embed_frame(frame), st.next_input[:b])
        st.pos[:b] += active
        st.frame[:b] += active

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
