"""A reply's turn keeps its sentences: each is its own CSM context segment, on disk and after a barge-in."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from serve_app.history import (
    ConversationNotFound,
    HistoryStore,
    Turn,
    check_conversation_id,
)


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
    conv = await store.create("token:alice")
    turn = Turn("i", "assistant", "One. Two.", frames(5), sentences=[("One.", 3), ("Two.", 2)])
    await store.append(conv, turn)
    await store.append(conv, Turn("old", "assistant", "no sentences", frames(2)))  # an older file's line
    await store.truncate(conv, "i", 4)
    loaded, old = await store.open(conv, "token:alice")
    assert loaded.sentences == [("One.", 3), ("Two.", 1)]
    np.testing.assert_array_equal(loaded.codes, frames(4))
    assert old.sentences is None and [t for t, _ in old.parts()] == ["no sentences"]


# ---- ownership, the live lease, bounds -----------------------------------------------------------------


async def test_ids_are_the_servers_and_a_conversation_is_its_owners_alone(tmp_path):
    store = HistoryStore(tmp_path)
    a, b = await store.create("token:alice"), await store.create("token:alice")
    assert a != b and a.startswith("conv_") and len(a) == 5 + 32  # 128 random bits each
    await store.append(a, Turn("item_1", "user", "my secret", frames(3)))
    before = (tmp_path / f"{a}.jsonl").read_bytes()
    assert [t.text for t in await store.open(a, "token:alice")] == ["my secret"]
    for conversation, principal in ((a, "token:bob"), ("conv_" + "0" * 32, "token:alice"), ("mine", "x")):
        with pytest.raises(ConversationNotFound):  # another's, or none at all: one answer, no hint
            await store.open(conversation, principal)
    assert (tmp_path / f"{a}.jsonl").read_bytes() == before  # a refused attempt writes nothing
    assert not (tmp_path / "mine.jsonl").exists()
    with pytest.raises(ConversationNotFound):
        await store.open("../etc/passwd", "token:alice")  # not an id at all: the same answer


def test_an_id_with_a_trailing_newline_is_not_an_id():
    with pytest.raises(ValueError):
        check_conversation_id("conv_1\n")  # `re.match` with `$` let this through
    assert check_conversation_id("conv_1") == "conv_1"


async def test_the_newest_connection_holds_the_conversation(tmp_path):
    store = HistoryStore(tmp_path)
    conv = await store.create("token:alice")
    await store.claim(conv, "conn_1")
    assert await store.holds(conv, "conn_1")
    await store.claim(conv, "conn_2")  # a newer connection takes it over...
    assert not await store.holds(conv, "conn_1")  # ...and the older one learns it at its next check
    assert await store.holds(conv, "conn_2")
    await store.release(conv, "conn_1")  # not its lease any more: nothing happens
    assert await store.holds(conv, "conn_2")
    await store.release(conv, "conn_2")
    assert not await store.holds(conv, "conn_2") and not (tmp_path / f"{conv}.live").exists()


async def test_memory_keeps_the_last_turns_and_the_file_is_compacted_under_its_cap(tmp_path):
    store = HistoryStore(tmp_path, max_turns=3, max_bytes=4000)
    conv = await store.create("token:alice")
    for i in range(12):
        await store.append(conv, Turn(f"item_{i}", "user", f"turn {i}", frames(8)))
    assert [t.text for t in await store.open(conv, "token:alice")] == ["turn 9", "turn 10", "turn 11"]
    path = tmp_path / f"{conv}.jsonl"
    assert path.stat().st_size <= 4000  # compacted as it grew, the owner kept
    assert (await store.open(conv, "token:alice"))[-1].text == "turn 11"
    with pytest.raises(ConversationNotFound):
        await store.open(conv, "token:bob")


async def test_conversations_past_their_retention_are_deleted(tmp_path):
    store = HistoryStore(tmp_path, retention_s=3600)
    old, new = await store.create("token:alice"), await store.create("token:alice")
    long_ago = time.time() - 7200
    os.utime(tmp_path / f"{old}.jsonl", (long_ago, long_ago))
    assert await store.sweep() == 1
    assert not (tmp_path / f"{old}.jsonl").exists() and (tmp_path / f"{new}.jsonl").exists()
    os.utime(tmp_path / f"{new}.jsonl", (long_ago, long_ago))
    with pytest.raises(ConversationNotFound):  # expired when someone tries to open it: gone too
        await store.open(new, "token:alice")
    assert not (tmp_path / f"{new}.jsonl").exists()
