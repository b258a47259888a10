import { beforeEach, describe, expect, it } from "vitest";
import type { ClientEvent, ServerEvent } from "../lib/protocol";
import { type TurnCounters, TurnTracker } from "../lib/turnTracker";
import type { ViewEvent } from "../lib/viewState";
import { audio, Clock, FakePlayer, settle } from "./fakes";

let clock: Clock;
let player: FakePlayer;
let sent: ClientEvent[];
let shown: ViewEvent[];
let counters: TurnCounters;

function makeTracker(flushTimeoutMs = 500): TurnTracker {
  const tracker = new TurnTracker({
    send: (event) => sent.push(event) > 0,
    show: (events) => shown.push(...events),
    timers: clock,
    now: () => clock.now,
    flushTimeoutMs,
    counters,
  });
  tracker.setPlayer(player);
  return tracker;
}

const rx = (tracker: TurnTracker, event: ServerEvent) => tracker.serverEvent(event);
const shownTypes = () => shown.map((e) => (e.type === "reply.status" ? `${e.type} ${e.itemId} ${e.status}` : e.type));

/** The person's turn, then a reply with `deltas` deltas of 3840 samples (160 ms) each. */
function turnAndReply(tracker: TurnTracker, deltas: number, response = "resp_1", item = "item_r"): void {
  rx(tracker, { type: "input_audio_buffer.speech_started", item_id: "item_u", audio_start_ms: 0 });
  clock.advance(1500);
  rx(tracker, { type: "input_audio_buffer.speech_stopped", item_id: "item_u", audio_end_ms: 1500 });
  rx(tracker, { type: "response.created", response: { id: response } });
  rx(tracker, { type: "response.output_item.added", response_id: response, item: { id: item } });
  for (let k = 0; k < deltas; k++) rx(tracker, { type: "response.output_audio.delta", response_id: response, item_id: item, delta: audio(3840) });
}

beforeEach(() => {
  clock = new Clock();
  player = new FakePlayer();
  sent = [];
  shown = [];
  counters = { receivedByItem: {}, playedByItem: {}, truncates: [], flushes: [], truncated: [] };
});

describe("TurnTracker: a turn", () => {
  it("thinks from the end of the person's turn, speaks once the player starts, and measures the wait", () => {
    const tracker = makeTracker();
    turnAndReply(tracker, 2);
    expect(tracker.activity).toBe("thinking");
    expect(player.pushed).toHaveLength(2);
    clock.advance(300);
    tracker.playbackStarted("item_r", 20);
    expect(tracker.activity).toBe("speaking");
    expect(shown.at(-1)).toEqual({ type: "reply.heard", latencyMs: 320 });
    rx(tracker, { type: "response.output_audio.done", response_id: "resp_1", item_id: "item_r" });
    rx(tracker, { type: "response.done", response: { id: "resp_1", status: "completed" } });
    expect(player.ended).toEqual(["item_r"]);
    expect(shownTypes()).not.toContain("reply.status item_r done"); // still playing
    tracker.playbackFinished("item_r");
    tracker.playbackDrained();
    expect(shownTypes().at(-1)).toBe("reply.status item_r done");
    expect(tracker.activity).toBe("quiet");
  });

  it("counts the wait from the commit when no speech_stopped came", () => {
    const tracker = makeTracker();
    clock.advance(1000);
    rx(tracker, { type: "input_audio_buffer.committed", item_id: "item_u" });
    rx(tracker, { type: "response.created", response: { id: "resp_1" } });
    rx(tracker, { type: "response.output_audio.delta", response_id: "resp_1", item_id: "item_r", delta: audio(1920) });
    clock.advance(250);
    tracker.playbackStarted("item_r", 0);
    expect(shown.at(-1)).toEqual({ type: "reply.heard", latencyMs: 250 });
  });

  it("a failed reply marks its line failed and shows why", () => {
    const tracker = makeTracker();
    turnAndReply(tracker, 0);
    const error = { code: "response_failed", message: "replica died" };
    rx(tracker, { type: "response.done", response: { id: "resp_1", status: "failed", status_details: { error } } });
    expect(shown.slice(-2)).toEqual([{ type: "reply.status", itemId: "item_r", status: "failed" }, { type: "notice", ...error }]);
    expect(tracker.activity).toBe("quiet");
  });
});

describe("TurnTracker: barge-in", () => {
  it("speech during a reply drops it: flushed, truncated to what was played, its late words left out", async () => {
    const tracker = makeTracker();
    turnAndReply(tracker, 20);
    tracker.playbackStarted("item_r", 0);
    player.flushResult = { item_r: 36_012 }; // 1500.5 ms played
    rx(tracker, { type: "input_audio_buffer.speech_started", item_id: "item_u2", audio_start_ms: 4000 });
    expect(tracker.activity).toBe("quiet");
    await settle();
    expect(sent).toEqual([{ type: "conversation.item.truncate", item_id: "item_r", content_index: 0, audio_end_ms: 1500 }]);
    expect(counters.truncates).toEqual([{ itemId: "item_r", audioEndMs: 1500, reason: "barge-in" }]);
    expect(counters.flushes).toEqual([{ reason: "barge-in", played: { item_r: 36_012 } }]);
    expect(shown.at(-1)).toEqual({ type: "reply.status", itemId: "item_r", status: "interrupted" });
    shown = [];
    rx(tracker, { type: "response.output_audio_transcript.delta", response_id: "resp_1", item_id: "item_r", delta: "late" });
    rx(tracker, { type: "response.output_audio.delta", response_id: "resp_1", item_id: "item_r", delta: audio(3840) });
    expect(shown).toEqual([]);
    expect(player.pushed).toHaveLength(20);
  });

  it("uses the last progress report when the player does not answer in time", async () => {
    const tracker = makeTracker(100);
    turnAndReply(tracker, 20);
    tracker.playbackStarted("item_r", 0);
    tracker.playbackProgress([{ itemId: "item_r", played: 48_000 }]);
    player.flush = () => new Promise(() => {}); // a worklet that never answers
    rx(tracker, { type: "input_audio_buffer.speech_started", item_id: "item_u2", audio_start_ms: 0 });
    await settle();
    clock.advance(100);
    await settle();
    expect(sent.at(-1)).toEqual({ type: "conversation.item.truncate", item_id: "item_r", content_index: 0, audio_end_ms: 2000 });
  });

  it("a typed turn during a reply cancels it and asks for the new one only when it is done", async () => {
    const tracker = makeTracker();
    turnAndReply(tracker, 4);
    expect(tracker.replyInProgress).toBe(true);
    await tracker.interrupt("typed", true);
    tracker.typed();
    expect(sent.map((e) => e.type)).toEqual(["response.cancel", "conversation.item.truncate"]);
    rx(tracker, { type: "response.done", response: { id: "resp_1", status: "cancelled" } });
    expect(sent.at(-1)).toEqual({ type: "response.create" });
    expect(tracker.activity).toBe("thinking");
  });

  it("a lost connection silences what was queued; a new call forgets the last one's items", () => {
    const tracker = makeTracker();
    turnAndReply(tracker, 3);
    tracker.dropAll();
    expect(player.flushes).toBe(1);
    expect(tracker.replyInProgress).toBe(true); // the response is still open until reset
    tracker.reset();
    expect(tracker.replyInProgress).toBe(false);
    turnAndReply(tracker, 3, "resp_2", "item_r2");
    tracker.clear();
    expect(tracker.replyInProgress).toBe(false);
    expect(tracker.activity).toBe("quiet");
  });
});
