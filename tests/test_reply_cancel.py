"""Stopping a reply: the task is cancelled once, so its cleanup (remember the heard turn, response.done)
always runs to the end, however many stops arrive (barge-in, then the page's truncate or a cancel)."""

from __future__ import annotations

import asyncio

from serve_app import protocol as p
from serve_app.reply import Observer, Reply
from serve_app.services import Services


async def _reply_with_slow_cleanup(log: list[str]) -> Reply:
    response = p.RealtimeResponse(conversation_id="conv_test")
    # The task below stands in for `Reply.run`: only stopping is under test, so no services are needed.
    services: Services = None  # type: ignore[assignment]
    reply = Reply(response, p.Sampling(), 100, services, send=lambda event: None, observe=Observer())

    async def respond() -> None:
        try:
            await asyncio.sleep(30)  # speaking
        except asyncio.CancelledError:
            log.append(f"cancelled: {reply.cancel_reason}")
        finally:
            await asyncio.sleep(0.05)  # closing the decoder stream, writing the history
            log.append("remembered")

    reply.task = asyncio.get_running_loop().create_task(respond())
    await asyncio.sleep(0.01)
    return reply


def test_a_second_stop_during_cleanup_does_not_cut_it_short():
    async def scenario() -> list[str]:
        log: list[str] = []
        reply = await _reply_with_slow_cleanup(log)
        reply.stop("turn_detected")  # the server heard the person: barge-in
        await asyncio.sleep(0.01)  # the task is now in its cleanup
        reply.stop()  # the page's truncate for the same reply
        reply.stop("client_cancelled")  # and a response.cancel
        await asyncio.gather(reply.task, return_exceptions=True)
        return log

    assert asyncio.run(scenario()) == ["cancelled: turn_detected", "remembered"]


def test_stop_on_a_finished_reply_does_nothing():
    async def scenario() -> Reply:
        reply = await _reply_with_slow_cleanup([])
        reply.stop()
        await asyncio.gather(reply.task, return_exceptions=True)
        reply.stop("turn_detected")
        return reply

    reply = asyncio.run(scenario())
    assert reply.task.done() and reply.cancel_reason == "client_cancelled"
