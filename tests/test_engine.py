"""The engine's contract: reproducible seeds whatever the batch, slots freed on cancel/EOS, bounded
admission, prefill that never stalls the streams already running."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from csm.engine import Engine, EngineConfig, EngineFull, SamplingParams
from csm.loading import random_model
from csm.prompt import PromptBuilder, Segment
from csm.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def model():
    return random_model("tiny", seed=7).model


def prompt(model, text="hello there", frames=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    ctx = [Segment(0, "context", torch.randint(0, 2048, (frames, 32), generator=g))]
    return PromptBuilder(ByteTokenizer(), model.args).build(ctx, 1, text, 32)


def collect(engine):
    out = engine.run_to_completion()
    return {k: np.stack(v) if v else np.zeros((0, 32), dtype=np.int64) for k, v in out.items()}


def test_same_seed_same_codes_whatever_the_batch(model):
    p = prompt(model)
    sp = SamplingParams(temperature=0.9, top_k=50, seed=1234)
    alone = Engine(model, EngineConfig(max_slots=4))
    rid = alone.add(p.tokens, p.mask, 12, sp)
    ref = collect(alone)[rid]

    crowded = Engine(model, EngineConfig(max_slots=4))
    others = []
    for i in range(2):
        q = prompt(model, f"other {i}", 2 + i, i)
        others.append(crowded.add(q.tokens, q.mask, 20, SamplingParams(seed=i)))
    early = [ev for _ in range(2) for ev in crowded.step() if ev.codes is not None]
    rid2 = crowded.add(p.tokens, p.mask, 12, sp)  # joins mid-stream, lands in a different slot
    got = collect(crowded)
    np.testing.assert_array_equal(got[rid2], ref)
    assert all(len(got[o]) + sum(ev.request_id == o for ev in early) == 20 for o in others)
    # And a different seed gives different codes.
    other = Engine(model, EngineConfig(max_slots=1))
    rid3 = other.add(p.tokens, p.mask, 12, SamplingParams(temperature=0.9, top_k=50, seed=99))
    assert not np.array_equal(collect(other)[rid3], ref)


def test_admission_is_bounded_and_cancel_frees_the_slot(model):
    engine = Engine(model, EngineConfig(max_slots=2))
    p = prompt(model)
    a = engine.add(p.tokens, p.mask, 100)
    engine.add(p.tokens, p.mask, 100)
    with pytest.raises(EngineFull, match="2 generation slots are busy"):
        engine.add(p.tokens, p.mask, 100)
    engine.step()
    assert engine.cancel(a)
    events = engine.step()
    assert any(ev.request_id == a and ev.done and ev.reason == "cancelled" for ev in events)
    assert not engine.cancel(a)  # already gone
    c = engine.add(p.tokens, p.mask, 3)  # the freed slot takes the next request
    frames = [ev for _ in range(6) for ev in engine.step() if ev.request_id == c and ev.codes is not None]
    assert len(frames) == 3


def test_max_frames_ends_the_stream(model):
    engine = Engine(model, EngineConfig(max_slots=1))
    p = prompt(model)
    rid = engine.add(p.tokens, p.mask, 5)
    events = [ev for _ in range(10) for ev in engine.step()]
    assert [ev.reason for ev in events if ev.done] == ["max_frames"]
    assert len([ev for ev in events if ev.request_id == rid and ev.codes is not None]) == 5
    assert not engine.has_work


def test_all_zero_frame_is_eos(model):
    silent = random_model("tiny", seed=7).model
    with torch.no_grad():  # all logits equal -> greedy picks code 0 everywhere -> the EOS frame
        silent.codebook0_head.weight.zero_()
        silent.audio_head.zero_()
    engine = Engine(silent, EngineConfig(max_slots=1))
    p = prompt(silent)
    rid = engine.add(p.tokens, p.mask, 10, SamplingParams(temperature=0))
    events = engine.step()
    assert [(ev.request_id, ev.codes, ev.done, ev.reason) for ev in events] == [(rid, None, True, "eos")]
    assert not engine.has_work


def test_prefill_never_stalls_running_streams(model):
    engine = Engine(model, EngineConfig(max_slots=3, prefill_chunk=16))
    short = prompt(model, "hi", 1)
    runner = engine.add(short.tokens, short.mask, 40)
    engine.step()
    engine.step()
    long_p = prompt(model, "a much longer prompt " * 4, 60)  # well over 16 rows: several prefill steps
    joiner = engine.add(long_p.tokens, long_p.mask, 3)
    before = engine.stats.prefill_steps
    prefill_steps = -(-(len(long_p) - 1) // 16)
    for _ in range(prefill_steps - 1):
        events = engine.step()
        # Every step during the joiner's prefill still gives the running stream its frame.
        assert [ev.request_id for ev in events if ev.codes is not None] == [runner]
    # The step that prefills the last chunk already batches the joiner's first frame with the runner's.
    events = engine.step()
    assert [ev.request_id for ev in events if ev.codes is not None] == [runner, joiner]
    assert engine.stats.prefill_steps - before == prefill_steps


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_frames": 0}, "max_frames"),
        ({"max_frames": 4000}, "exceeds"),
        ({"sampling": SamplingParams(temperature=-1)}, "temperature"),
        ({"sampling": SamplingParams(top_k=0)}, "top_k"),
        ({"sampling": SamplingParams(top_k=5000)}, "top_k"),
        ({"sampling": SamplingParams(seed=-3)}, "seed"),
    ],
)
def test_bad_requests_are_refused_clearly(model, kwargs, message):
    engine = Engine(model, EngineConfig(max_slots=1))
    p = prompt(model)
    args = {"max_frames": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        engine.add(p.tokens, p.mask, **args)
    assert not engine.has_work  # nothing half-admitted


def test_bad_prompt_tensors_are_refused(model):
    engine = Engine(model, EngineConfig(max_slots=1))
    p = prompt(model)
    with pytest.raises(ValueError, match="rows, 33"):
        engine.add(p.tokens[:, :32], p.mask[:, :32], 4)
    bad = p.tokens.clone()
    bad[0, -1] = model.args.text_vocab_size
    with pytest.raises(ValueError, match="text token"):
        engine.add(bad, p.mask, 4)
    with pytest.raises(ValueError, match="empty"):
        engine.add(p.tokens[:0], p.mask[:0], 4)


def test_bucketed_static_shapes_give_the_same_codes(model):
    """The shapes CUDA graphs run (padded batch, bucketed KV length, full-vocab top-k, mixed sampling)
    give exactly the codes of the exact-shape CPU path: padding rows and masked columns leave no trace."""
    prompts = [prompt(model, f"stream {i}", 2 + 3 * i, i) for i in range(3)]
    params = [
        SamplingParams(temperature=0.9, top_k=50, seed=11),
        SamplingParams(0.0),
        SamplingParams(1.2, 7, 3),
    ]

    def run(static: bool):
        engine = Engine(
            model, EngineConfig(max_slots=4, prefill_chunk=16, static_shapes=static, kv_bucket=64)
        )
        ids, out = [], {}
        for step in range(40):
            if step in (0, 3, 5):  # staggered joins; the third lands while the first two decode
                p = prompts[len(ids)]
                ids.append(engine.add(p.tokens, p.mask, 30, params[len(ids)]))
            for ev in engine.step():
                if ev.codes is not None:
                    out.setdefault(ev.request_id, []).append(ev.codes)
        assert not engine.has_work
        return [np.stack(out[i]) for i in ids]

    for exact, bucketed in zip(run(False), run(True), strict=True):
        np.testing.assert_array_equal(bucketed, exact)


def test_prefill_threads_apply_to_prefill_steps_only(model):
    """`prefill_threads` runs prefill steps on more torch threads, frame steps on the process's count;
    the codes are the same either way."""
    p = prompt(model, frames=40)
    before = torch.get_num_threads()
    seen: list[int] = []
    engine = Engine(model, EngineConfig(max_slots=2, prefill_chunk=16, prefill_threads=before + 1))
    prefill = engine._prefill

    def counting(group):
        seen.append(torch.get_num_threads())
        return prefill(group)

    engine._prefill = counting
    rid = engine.add(p.tokens, p.mask, 6, SamplingParams(temperature=0.9, top_k=50, seed=5))
    got = collect(engine)[rid]
    assert seen and set(seen) == {before + 1} and torch.get_num_threads() == before
    plain = Engine(model, EngineConfig(max_slots=2, prefill_chunk=16))
    rid = plain.add(p.tokens, p.mask, 6, SamplingParams(temperature=0.9, top_k=50, seed=5))
    np.testing.assert_array_equal(collect(plain)[rid], got)


def test_prefill_widths_are_aligned_and_leave_no_trace(model):
    """Prefill steps compute a multiple of `prefill_align` columns (a bounded set of matmul shapes: on CPU
    oneDNN keeps a kernel per shape), the padding never reaches the codes: the same codes as exact widths."""
    prompts = [prompt(model, "x" * n, frames, n) for n, frames in ((3, 1), (17, 5), (40, 9))]
    params = SamplingParams(temperature=0.9, top_k=50, seed=3)

    def run(align: int) -> tuple[list[np.ndarray], set[int]]:
        engine = Engine(model, EngineConfig(max_slots=4, prefill_chunk=64, prefill_align=align))
        widths: set[int] = set()
        fill = engine.model.backbone.fill_cache

        def recording(x, *args):
            widths.add(x.shape[1])
            return fill(x, *args)

        engine.model.backbone.fill_cache = recording
        try:
            ids = [engine.add(p.tokens, p.mask, 8, params) for p in prompts]
            out = collect(engine)
        finally:
            del engine.model.backbone.fill_cache
        return [out[i] for i in ids], widths

    exact, exact_widths = run(1)
    aligned, aligned_widths = run(16)
    assert len(exact_widths) > 2 and not all(w % 16 == 0 for w in exact_widths)
    assert aligned_widths and all(w % 16 == 0 and w <= 64 for w in aligned_widths)
    for a, e in zip(aligned, exact, strict=True):
        np.testing.assert_array_equal(a, e)
    with pytest.raises(ValueError, match="prefill_align"):
        EngineConfig(prefill_align=0)
