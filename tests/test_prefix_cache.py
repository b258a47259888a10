"""Nothing prefilled twice: a conversation's later replies prefill only their new rows (parked slots, the host
tier, shared voice prefixes), give the codes a fresh prefill gives, and never crowd out a new request."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from csm.engine import (
    Engine,
    EngineConfig,
    EngineFull,
    SamplingParams,
    kv_bytes_per_row,
    slot_bytes,
    slots_for_memory,
)
from csm.loading import random_model
from csm.prompt import PromptBuilder, Segment
from csm.tokenizer import ByteTokenizer

GREEDY = SamplingParams(temperature=0.0)
SEEDED = SamplingParams(temperature=0.9, top_k=50, seed=4321)


@pytest.fixture(scope="module")
def model():
    return random_model("tiny", seed=3).model


@pytest.fixture(scope="module")
def builder(model):
    return PromptBuilder(ByteTokenizer(), model.args)


def heard(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 2048, (n, 32), generator=torch.Generator().manual_seed(seed))


VOICE = Segment(0, "this is how I sound", heard(6, 99))


class Talk:
    """One conversation against an engine: each reply goes into the context as the engine made it."""

    def __init__(self, engine: Engine, builder: PromptBuilder, key: str, voice: bool = True) -> None:
        self.engine, self.builder, self.key = engine, builder, key
        self.context = [VOICE] if voice else []
        self.voice = voice

    def prompt(self, text: str):
        return self.builder.build(self.context, 0, text, 40, keep_first=1 if self.voice else 0)

    def reply(self, text: str, frames: int = 6, sampling: SamplingParams = GREEDY, heard_frames=None):
        p = self.prompt(text)
        rid = self.engine.add(
            p.tokens, p.mask, frames, sampling, cache_key=self.key,
            prefix_key="voice" if self.voice else None, prefix_rows=p.pinned_rows,
        )  # fmt: skip
        codes, reused = run(self.engine, rid)
        kept = codes if heard_frames is None else codes[:heard_frames]
        self.context.append(Segment(0, text, torch.from_numpy(kept)))
        return codes, reused, len(p)

    def person(self, text: str, seed: int) -> None:
        self.context.append(Segment(1, text, heard(5, seed)))


def run(engine: Engine, rid: str) -> tuple[np.ndarray, int]:
    frames, reused = [], None
    while engine.has_work:
        for ev in engine.step():
            if ev.request_id != rid:
                continue
            if ev.reused is not None:
                reused = ev.reused
            if ev.codes is not None:
                frames.append(ev.codes)
    return np.stack(frames), reused


def fresh(model, p, frames, sampling) -> np.ndarray:
    """The same prompt on an engine that has never seen it: everything prefilled from row 0."""
    engine = Engine(model, EngineConfig(max_slots=2, prefix_cache=False))
    return run(engine, engine.add(p.tokens, p.mask, frames, sampling))[0]


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_later_replies_prefill_only_their_new_rows_and_match_a_fresh_prefill(model, builder, sampling):
    engine = Engine(model, EngineConfig(max_slots=3, prefill_chunk=32))
    talk = Talk(engine, builder, "conv")
    talk.person("hello there", 1)
    _, reused, _ = talk.reply("first reply", sampling=sampling)
    assert reused == 0
    for turn in range(3):
        held = len(talk.prompt("x")) - len(builder.text_rows(0, "x")[0])  # rows before this reply's text
        talk.person(f"and then {turn}", 10 + turn)
        p = talk.prompt(f"reply number {turn}")
        prefilled = engine.stats.prefilled_rows
        codes, reused, rows = talk.reply(f"reply number {turn}", sampling=sampling)
        # The last reply's frames went back as fed, less the newest (never fed), then its EOS row.
        assert reused == held - 2
        assert engine.stats.prefilled_rows - prefilled == rows - reused
        assert rows - reused < rows / 2
        np.testing.assert_array_equal(codes, fresh(model, p, 6, sampling))
    assert engine.stats.reused_rows > 0 and engine.n_parked == 1


def test_reused_keys_and_values_agree_with_a_fresh_prefill(model, builder):
    """Reuse is exact up to how a one-row frame step and a batched prefill round: the cached rows' keys
    and values differ from a fresh prefill's by float rounding only (fp32, 1e-5 relative)."""
    engine = Engine(model, EngineConfig(max_slots=2, prefill_chunk=32))
    talk = Talk(engine, builder, "conv")
    talk.person("hello", 1)
    talk.reply("first")
    talk.person("more", 2)
    p = talk.prompt("second")
    engine.add(p.tokens, p.mask, 1, GREEDY, cache_key="conv")
    engine.step()  # prefilled and its first frame made: the slot holds every prompt row
    ref = Engine(model, EngineConfig(max_slots=2, prefix_cache=False))
    ref.add(p.tokens, p.mask, 1, GREEDY)
    ref.step()
    n = len(p)
    got, want = engine._state.k[:, 0, :, :n], ref._state.k[:, 0, :, :n]
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 1e-5


def test_eviction_to_the_host_tier_and_back(model, builder):
    row = kv_bytes_per_row(model.args, torch.float32)
    engine = Engine(model, EngineConfig(max_slots=1, host_cache_bytes=4000 * row))
    a, b = Talk(engine, builder, "a"), Talk(engine, builder, "b", voice=False)
    a.person("hi from a", 1)
    a.reply("answer a")
    b.person("hi from b", 2)
    b.reply("answer b")  # one slot: a's parked rows go to host memory
    assert engine.stats.evictions == 1 and engine.n_host == 1 and engine.host_bytes > 0
    a.person("a again", 3)
    p = a.prompt("second answer a")
    codes, reused, rows = a.reply("second answer a")
    assert engine.stats.host_restores == 1 and reused > rows / 2
    np.testing.assert_array_equal(codes, fresh(model, p, 6, GREEDY))


def test_a_barge_in_keeps_what_was_fed_and_the_heard_part_is_a_prefix(model, builder):
    engine = Engine(model, EngineConfig(max_slots=2))
    talk = Talk(engine, builder, "conv")
    talk.person("hello", 1)
    p = talk.prompt("a long reply that gets interrupted")
    rid = engine.add(p.tokens, p.mask, 30, GREEDY, cache_key="conv")
    made = []
    while len(made) < 8:
        made += [ev.codes for ev in engine.step() if ev.codes is not None]
    engine.cancel(rid)
    engine.step()
    assert not engine.has_work and engine.n_parked == 1
    # The person heard 5 of the 8 frames: that is what the conversation keeps.
    talk.context.append(
        Segment(0, "a long reply that gets interrupted", torch.from_numpy(np.stack(made[:5])))
    )
    talk.person("wait", 2)
    p2 = talk.prompt("ok")
    codes, reused, _ = talk.reply("ok")
    assert reused == len(p) + 5  # the prompt and the heard frames; the sixth fed frame differs (EOS row)
    np.testing.assert_array_equal(codes, fresh(model, p2, 6, GREEDY))


def test_a_truncated_context_reuses_only_what_still_matches(model, builder):
    engine = Engine(model, EngineConfig(max_slots=2))
    talk = Talk(engine, builder, "conv")
    talk.person("hello", 1)
    talk.reply("first")
    talk.context = [VOICE, *talk.context[2:]]  # the oldest turn is dropped, the voice stays
    talk.person("next", 2)
    p = talk.prompt("second")
    codes, reused, _ = talk.reply("second")
    # Only the pinned voice still lines up, and the next segment's BOS and "[" (its speaker then differs).
    assert reused == len(builder.segment_rows(VOICE)[0]) + 2
    np.testing.assert_array_equal(codes, fresh(model, p, 6, GREEDY))


def test_a_voice_prefix_is_shared_across_conversations(model, builder):
    engine = Engine(model, EngineConfig(max_slots=3))
    first = Talk(engine, builder, "first")
    first.person("hello", 1)
    first.reply("one")
    other = Talk(engine, builder, "other")
    other.person("a different person", 7)
    p = other.prompt("welcome")
    codes, reused, _ = other.reply("welcome")
    assert reused == p.pinned_rows > 0 and engine.stats.shared_prefix_hits == 1
    np.testing.assert_array_equal(codes, fresh(model, p, 6, GREEDY))


def test_parked_slots_are_evicted_least_recently_used_and_never_refuse_a_request(model, builder):
    engine = Engine(model, EngineConfig(max_slots=2))
    a, b = Talk(engine, builder, "a", voice=False), Talk(engine, builder, "b", voice=False)
    for t in (a, b):
        t.person("hi", 1)
        t.reply("hello")
    a.person("again", 2)
    a.reply("sure")  # a is now the most recently used
    assert engine.n_parked == 2
    c = Talk(engine, builder, "c", voice=False)
    c.person("new here", 3)
    c.reply("welcome")  # evicts b, the least recently used
    assert engine.stats.evictions == 1
    a.person("still here", 5)
    _, reused_a, _ = a.reply("yes")  # still parked
    b.person("back", 4)
    _, reused_b, _ = b.reply("hm")  # evicted: prefilled from scratch (and evicts c)
    assert reused_a > 0 and reused_b == 0 and engine.stats.evictions == 2
    # Both slots parked: two new requests are admitted at once; a third, with both running, is refused.
    p = builder.build([], 0, "x", 8)
    engine.add(p.tokens, p.mask, 8)
    engine.add(p.tokens, p.mask, 8)
    with pytest.raises(EngineFull):
        engine.add(p.tokens, p.mask, 8)


def test_active_rows_stay_dense_through_churn_and_moves_change_no_code(model, builder):
    """Sequences of different lengths join and leave, some parking, some reusing: every frame step
    computes exactly the active sequences (bucket == active count), and each sequence's codes are those it
    makes alone."""
    engine = Engine(model, EngineConfig(max_slots=6, prefill_chunk=24))
    joins = [0, 0, 1, 3, 4, 6, 9, 11, 12]  # the step each sequence arrives at
    lengths = [5, 14, 3, 9, 7, 4, 12, 6, 8]
    prompts = [builder.build([Segment(1, f"turn {i}", heard(2 + i, i))], 0, f"r{i}", 20) for i in range(9)]
    ids, out = {}, {}
    for step in range(80):
        for i in (i for i, at in enumerate(joins) if at == step):
            p = prompts[i]
            ids[engine.add(p.tokens, p.mask, lengths[i], SamplingParams(seed=i), cache_key=f"k{i % 4}")] = i
        for ev in engine.step():
            if ev.codes is not None:
                out.setdefault(ev.request_id, []).append(ev.codes)
        assert engine.bucket == engine.n_active
        if step > joins[-1] and not engine.has_work:
            break
    assert len(ids) == 9 and not engine.has_work
    assert engine.stats.relocations > 0  # the test did make the engine move slots
    for rid, i in ids.items():
        alone = fresh(model, prompts[i], lengths[i], SamplingParams(seed=i))
        np.testing.assert_array_equal(np.stack(out[rid]), alone)


def test_without_the_cache_nothing_is_reused(model, builder):
    engine = Engine(model, EngineConfig(max_slots=2, prefix_cache=False))
    talk = Talk(engine, builder, "conv")
    talk.person("hello", 1)
    talk.reply("first")
    talk.person("again", 2)
    _, reused, _ = talk.reply("second")
    assert reused == 0 and engine.stats.reused_rows == 0 and engine.n_parked == 0


def test_slot_count_from_memory():
    args = random_model("tiny", seed=0).model.args
    per = slot_bytes(args, torch.bfloat16)
    assert per > kv_bytes_per_row(args, torch.bfloat16) * args.max_seq_len
    assert slots_for_memory(10 * per + 5, per) == 10
    assert slots_for_memory(0, per) == 1 and slots_for_memory(10**15, per, limit=64) == 64


def test_auto_slots_fill_the_replicas_share_of_the_gpu(monkeypatch):
    """`max_slots: auto` on CUDA: the replica's share of the device, less the weights already there and a
    reserve, in slots (numbers as on a 16 GiB T4 with the generator's 0.6 share); elsewhere 8."""
    from types import SimpleNamespace

    from csm.presets import preset
    from deployments.generator import auto_slots

    args = preset("csm-1b")
    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=16 * gib))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (13 * gib, 16 * gib))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: int(2.4 * gib))
    per = slot_bytes(args, torch.float16)
    budget = int(0.6 * 16 * gib) - int(2.4 * gib) - gib
    slots = auto_slots(args, torch.float16, torch.device("cuda"), 0.6)
    assert slots == budget // per and 90 <= slots <= 100  # ~96 slots of 64 MiB, as the README says
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (2 * gib, 16 * gib))  # others took the rest
    assert auto_slots(args, torch.float16, torch.device("cuda"), 0.6) == (gib // per)
    assert auto_slots(args, torch.float16, torch.device("cpu"), None) == 8


def test_an_activation_that_moves_a_joiner_keeps_the_rows_it_just_prefilled(model, builder):
    """A new prompt and a conversation's next one prefill in the same step; the new one, done first,
    moves down into the conversation's slot, and the rows the conversation prefilled in that very step
    must move with it."""
    engine = Engine(model, EngineConfig(max_slots=3, prefill_chunk=64))
    talk = Talk(engine, builder, "conv", voice=False)
    talk.person("hello there", 1)
    talk.reply("first")  # parked in slot 0
    short = builder.build([], 0, "hi", 8)
    new = engine.add(short.tokens, short.mask, 3, GREEDY)  # slot 1: 0 is parked
    talk.person("and a longer turn to prefill", 2)
    p = talk.prompt("second")
    rid = engine.add(p.tokens, p.mask, 6, GREEDY, cache_key="conv")  # reuses slot 0 in place
    out = engine.run_to_completion()
    assert engine.stats.relocations > 0
    np.testing.assert_array_equal(np.stack(out[rid]), fresh(model, p, 6, GREEDY))
    np.testing.assert_array_equal(np.stack(out[new]), fresh(model, short, 3, GREEDY))
