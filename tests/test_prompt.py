"""Prompt rows exactly as the reference builds them; the context policy keeps the newest whole segments."""

from __future__ import annotations

import itertools

import pytest
import torch

from csm.presets import preset
from csm.prompt import PromptBuilder, Segment
from csm.tokenizer import ByteTokenizer


@pytest.fixture
def builder():
    return PromptBuilder(ByteTokenizer(), preset("tiny"))


def codes(n, value=5):
    return torch.full((n, 32), value, dtype=torch.long)


def test_segment_layout_matches_the_reference(builder):
    tokens, mask = builder.segment_rows(Segment(1, "hi", codes(3, 7)))
    text_ids = [256, *b"[1]hi", 257]  # BOS [1]hi EOS
    n_text = len(text_ids)
    assert tokens.shape == (n_text + 3 + 1, 33)
    assert tokens[:n_text, -1].tolist() == text_ids
    assert mask[:n_text].tolist() == [[False] * 32 + [True]] * n_text  # text rows: only the text column
    assert (tokens[n_text : n_text + 3, :32] == 7).all()
    assert (tokens[-1] == 0).all()  # the all-zero EOS frame
    assert mask[n_text:].tolist() == [[True] * 32 + [False]] * 4  # audio rows incl. EOS: only audio columns


def test_prompt_is_context_then_text_rows_of_the_reply(builder):
    p = builder.build([Segment(0, "a", codes(2)), Segment(1, "b", codes(2))], 0, "reply", max_frames=10)
    seg_rows = [builder.segment_rows(s)[0] for s in (Segment(0, "a", codes(2)), Segment(1, "b", codes(2)))]
    tail = builder.text_rows(0, "reply")[0]
    assert torch.equal(p.tokens, torch.cat([*seg_rows, tail]))
    assert p.n_context == 2


def test_long_context_drops_oldest_whole_segments(builder):
    segs = [Segment(i % 2, f"turn {i}", codes(100, i + 1)) for i in range(40)]  # ~4400 rows > 2048
    p = builder.build(segs, 0, "and now?", max_frames=200)
    assert len(p) <= 2048 - 200
    kept = segs[-p.n_context :]
    expected = torch.cat([builder.segment_rows(s)[0] for s in kept] + [builder.text_rows(0, "and now?")[0]])
    assert torch.equal(p.tokens, expected)  # the newest ones, whole, in order
    assert 0 < p.n_context < 40


def test_pinned_voice_segment_survives_truncation(builder):
    voice = Segment(0, "this is my voice", codes(20, 9))
    segs = [voice] + [Segment(i % 2, f"turn {i}", codes(100, i + 1)) for i in range(40)]
    p = builder.build(segs, 0, "hello", max_frames=100, keep_first=1)
    voice_rows = builder.segment_rows(voice)[0]
    assert torch.equal(p.tokens[: len(voice_rows)], voice_rows)
    assert len(p) <= 2048 - 100


def test_empty_context_and_text_only_segments(builder):
    p = builder.build([Segment(1, "typed words")], 0, "ok", max_frames=4)
    assert len(p) == len(builder.text_rows(1, "typed words")[0]) + len(builder.text_rows(0, "ok")[0])


@pytest.mark.parametrize(
    ("segment", "message"),
    [
        (Segment(0, "", None), "text is empty"),
        (Segment(0, "   ", None), "text is empty"),
        (Segment(99, "hi", None), "unknown speaker 99"),
        (Segment(-1, "hi", None), "unknown speaker"),
        (Segment("0", "hi", None), "unknown speaker"),  # type: ignore[arg-type]
        (Segment(0, "hi", torch.full((2, 32), 2051)), "out of range"),
        (Segment(0, "hi", torch.full((2, 32), -1)), "out of range"),
        (Segment(0, "hi", torch.zeros(2, 31, dtype=torch.long)), r"\[frames, 32\]"),
        (Segment(0, "hi", torch.zeros(2, 32, 1, dtype=torch.long)), r"\[frames, 32\]"),
        (Segment(0, "hi", torch.zeros(2, 32)), "integers"),
    ],
)
def test_bad_segments_raise_clear_errors(builder, segment, message):
    with pytest.raises(ValueError, match=message):
        builder.build([segment], 0, "reply", max_frames=4)


def test_bad_reply_requests_raise(builder):
    with pytest.raises(ValueError, match="text is empty"):
        builder.build([], 0, "", max_frames=4)
    with pytest.raises(ValueError, match="unknown speaker"):
        builder.build([], 16, "hi", max_frames=4)
    with pytest.raises(ValueError, match="too long"):
        builder.build([], 0, "x" * 3000, max_frames=4)
    with pytest.raises(ValueError, match="max_frames"):
        builder.build([], 0, "hi", max_frames=0)


def test_a_growing_conversation_is_cut_rarely_and_in_large_steps(builder):
    """Each turn's prompt extends the last one row for row, except at a cut; a cut drops old segments
    down to about half the budget, so cuts are rare and the prompt's leading rows (the engine's cached
    prefix) last for many turns. The voice stays first through every cut."""
    voice = Segment(0, "my voice", codes(20, 9))
    turns = [Segment(i % 2, f"turn {i}", codes(60, i % 7 + 1)) for i in range(120)]  # ~70 rows each
    prompts = [builder.build([voice, *turns[:n]], 0, "next", 100, keep_first=1) for n in range(1, 121)]
    voice_rows = builder.segment_rows(voice)[0]
    cuts = 0
    for before, after in itertools.pairwise(prompts):
        assert torch.equal(after.tokens[: len(voice_rows)], voice_rows)
        assert after.pinned_rows == len(voice_rows)
        context = len(before) - len(builder.text_rows(0, "next")[0])
        if not torch.equal(after.tokens[:context], before.tokens[:context]):
            cuts += 1
            assert len(after) < 1300  # cut down to about half, not just by one segment
    # ~8800 rows of turns through a ~1500-row window cut to half: a cut every ~10 turns (dropping just
    # what overflows would cut on every one of the ~100 turns after the window fills).
    assert 5 <= cuts <= 12


def test_segments_are_converted_once_by_content(builder):
    """A conversation sends the same segments with every sentence (as arrays across replicas): their rows
    are made once, keyed by content, so equal content shares rows and different codes never do."""
    import numpy as np

    codes = np.arange(64, dtype=np.int16).reshape(2, 32)
    first = builder.segment_rows(Segment(1, "hi", codes))
    again = builder.segment_rows(Segment(1, "hi", codes.copy()))  # a new object, as after a Ray call
    assert again[0] is first[0]
    as_tensor = builder.segment_rows(Segment(1, "hi", torch.from_numpy(codes.astype(np.int64))))
    assert torch.equal(as_tensor[0], first[0])
    other = codes.copy()
    other[1, 5] = 7
    assert not torch.equal(builder.segment_rows(Segment(1, "hi", other))[0], first[0])
    assert not torch.equal(builder.segment_rows(Segment(0, "hi", codes))[0], first[0])
    with pytest.raises(ValueError, match="integers"):
        builder.segment_rows(Segment(1, "hi", codes.astype(np.float32)))


def test_segment_cache_is_bounded_by_rows():
    """A long-running replica sees new segments every turn: the rows it keeps stay within `cache_rows`
    (least recently used dropped), a segment in use stays cached, and one larger than the budget is made
    but not kept."""
    import numpy as np

    builder = PromptBuilder(ByteTokenizer(), preset("tiny"), cache_rows=300)
    rng = np.random.default_rng(0)
    voice = Segment(0, "voice", rng.integers(0, 2048, (20, 32)))
    kept = builder.segment_rows(voice)
    for turn in range(40):  # each segment: text rows, 30 audio rows and the EOS row
        builder.segment_rows(Segment(1, f"turn {turn}", rng.integers(0, 2048, (30, 32))))
        assert builder.segment_rows(voice)[0] is kept[0]  # used every turn: never the oldest
        assert builder.cached_rows <= 300
        assert builder.cached_rows == sum(t.shape[0] for t, _ in builder._rows.values())
    assert len(builder._rows) < 10  # 41 segments made, only the newest few kept
    big = Segment(1, "long", rng.integers(0, 2048, (400, 32)))
    rows = builder.segment_rows(big)
    assert rows[0].shape[0] > 400 and builder.segment_rows(big)[0] is not rows[0]
    assert builder.segment_rows(voice)[0] is kept[0]
