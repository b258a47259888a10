"""A reply's turn keeps its sentences: each is its own CSM context segment, on disk and after a barge-in."""

from __future__ import annotations

import numpy as np

from serve_app.history import HistoryStore, Turn


def frames(n: int, start: int = 0) -> np.ndarray:
    return (np.arange(start, start + n, dtype=np.int16)[:, None] + np.zeros((1, 32), np.int16)) % 2051


def test_a_reply_is_one_segment_per_sentence():
    turn = Turn("item_1", "assistant", "One. Two.", frames(5), sentences=[("One.", 3), ("Two.", 2)])
    (t1, c1), (t2, c2) = turn.parts()
    assert (t1, t2) == ("One.", "Two.")
    np.testing.assert_array_equal(c1, frames(3))
    np.testing.assert_array_equal(c2, frames(2, 3))
    person = Turn("item_2", "user", "hi", frames(4))
    assert [t for t, _ in person.parts()] == ["hi"]
    assert Turn("item_3", "user", "typed").parts() == [("typed", None)]


def test_truncation_keeps_the_heard_sentences():
    turn = Turn(
        "i", "assistant", "One. Two. Three.", frames(9), sentences=[("One.", 3), ("Two.", 4), ("Three.", 2)]
    )
    turn.truncate(5)  # heard all of "One." and half of "Two."
    assert turn.frames == 5 and turn.sentences == [("One.", 3), ("Two.", 2)]
    turn.truncate(0)
    assert turn.frames == 0 and turn.sentences == [("One.", 0)]


async def test_sentences_survive_the_store_and_a_truncate_record(tmp_path):
    store = HistoryStore(tmp_path)
    turn = Turn("i", "assistant", "One. Two.", frames(5), sentences=[("One.", 3), ("Two.", 2)])
    await store.append("conv", turn)
    await store.append("conv", Turn("old", "assistant", "no sentences", frames(2)))  # an older file's line
    await store.truncate("conv", "i", 4)
    loaded, old = await store.load("conv")
    assert loaded.sentences == [("One.", 3), ("Two.", 1)]
    np.testing.assert_array_equal(loaded.codes, frames(4))
    assert old.sentences is None and [t for t, _ in old.parts()] == ["no sentences"]
