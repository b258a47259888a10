import { beforeEach, describe, expect, it } from "vitest";
import { type ClientOptions, RealtimeClient } from "../lib/realtimeClient";
import { audio, Clock, FakePlayer, type FakeSocket, fakeEndpoint, settle } from "./fakes";

let sockets: FakeSocket[];
let clock: Clock;
let player: FakePlayer;

function makeClient(options: Partial<ClientOptions> = {}): RealtimeClient {
  let ids = 0;
  const client = new RealtimeClient({
    ...fakeEndpoint(sockets, clock),
    now: () => clock.now,
    newId: (prefix) => `${prefix}_${++ids}`,
    ...options,
  });
  client.setPlayer(player);
  return client;
}

const last = () => sockets[sockets.length - 1];

function connect(client: RealtimeClient, info: Record<string, unknown> = {}): FakeSocket {
  client.start();
  const s = last();
  s.open();
  s.receive({ type: "session.created", session: {} });
  s.receive({ type: "x-server.info", voices: ["none", "narrator"], default_voice: "none", random_weights: true, max_reply_seconds: 6, ...info });
  return s;
}

/** The person's turn and the start of a reply with `deltas` deltas of 3840 samples (160 ms) each. */
function turnAndReply(s: FakeSocket, deltas: number, ids = { user: "item_u", reply: "item_r", response: "resp_1" }) {
  s.receive({ type: "input_audio_buffer.speech_started", item_id: ids.user, audio_start_ms: 0 });
  clock.advance(1500);
  s.receive({ type: "input_audio_buffer.speech_stopped", item_id: ids.user, audio_end_ms: 1500 });
  s.receive({ type: "input_audio_buffer.committed", item_id: ids.user });
  s.receive({ type: "response.created", response: { id: ids.response } });
  s.receive({ type: "response.output_item.added", response_id: ids.response, item: { id: ids.reply } });
  s.receive({ type: "conversation.item.input_audio_transcription.completed", item_id: ids.user, transcript: " hello there " });
  s.receive({ type: "response.output_audio_transcript.delta", response_id: ids.response, item_id: ids.reply, delta: "You said:" });
  s.receive({ type: "response.output_audio_transcript.delta", response_id: ids.response, item_id: ids.reply, delta: " hello there." });
  for (let k = 0; k < deltas; k++) {
    s.receive({ type: "response.output_audio.delta", response_id: ids.response, item_id: ids.reply, delta: audio(3840) });
  }
}

function finishReply(s: FakeSocket, status = "completed", ids = { reply: "item_r", response: "resp_1" }) {
  s.receive({ type: "response.output_audio.done", response_id: ids.response, item_id: ids.reply });
  s.receive({ type: "response.output_audio_transcript.done", response_id: ids.response, item_id: ids.reply, transcript: "You said: hello there." });
  s.receive({ type: "response.done", response: { id: ids.response, status } });
}

/** A reply of `deltas` deltas whose playback has started, still generating or (`finished`) done. */
function replyPlaying(deltas: number, finished = false): { client: RealtimeClient; s: FakeSocket } {
  const client = makeClient();
  const s = connect(client);
  turnAndReply(s, deltas);
  if (finished) finishReply(s);
  client.playbackStarted("item_r");
  return { client, s };
}

/** The person starts speaking again (a second turn), and the client's reaction settles. */
async function bargeIn(s: FakeSocket): Promise<void> {
  s.receive({ type: "input_audio_buffer.speech_started", item_id: "item_u2", audio_start_ms: 0 });
  await settle();
}

beforeEach(() => {
  sockets = [];
  clock = new Clock();
  player = new FakePlayer();
});

describe("RealtimeClient: session", () => {
  it("connects with the token, no conversation id of its own, and is listening once the session exists", () => {
    const client = makeClient();
    client.start();
    expect(client.phase).toBe("connecting");
    const url = new URL(last().url);
    expect(url.pathname).toBe("/v1/realtime");
    expect(url.searchParams.get("token")).toBe("s3cret");
    expect(url.searchParams.has("conversation_id")).toBe(false); // the server makes ids
    last().open();
    expect(client.phase).toBe("connecting");
    last().receive({ type: "session.created", session: {} });
    expect(client.phase).toBe("listening");
  });

  it("takes voices, the default voice and the random-weights flag from x-server.info", () => {
    const client = makeClient();
    connect(client);
    const snap = client.getSnapshot();
    expect(snap.voices).toEqual(["none", "narrator"]);
    expect(snap.defaultVoice).toBe("none");
    expect(snap.randomWeights).toBe(true);
    expect(snap.maxReplySeconds).toBe(6);
  });

  it("asks for the chosen voice on connect, and when it changes", () => {
    const client = makeClient({ voice: "narrator" });
    const s = connect(client);
    expect(s.sent).toContainEqual({ type: "session.update", session: { audio: { output: { voice: "narrator" } } } });
    client.setVoice("none");
    expect(s.sent.at(-1)).toEqual({ type: "session.update", session: { audio: { output: { voice: "none" } } } });
  });

  it("forgets a saved voice the server does not have", () => {
    const client = makeClient({ voice: "gone" });
    const s = connect(client);
    expect(s.types()).not.toContain("session.update");
    expect(client.getSnapshot().voice).toBeNull();
  });

});

describe("RealtimeClient: a turn", () => {
  it("goes listening → thinking → speaking → listening, with the transcript and the audio", () => {
    const client = makeClient();
    const s = connect(client);
    turnAndReply(s, 3);
    expect(client.phase).toBe("thinking");
    expect(player.pushed).toEqual([
      { itemId: "item_r", samples: 3840 },
      { itemId: "item_r", samples: 3840 },
      { itemId: "item_r", samples: 3840 },
    ]);
    expect(client.debug.receivedByItem).toEqual({ item_r: 11520 });
    const transcript = client.getSnapshot().transcript;
    expect(transcript.map((e) => [e.role, e.text])).toEqual([
      ["user", "hello there"],
      ["assistant", "You said: hello there."],
    ]);
    clock.advance(420);
    client.playbackStarted("item_r");
    expect(client.phase).toBe("speaking");
    expect(client.getSnapshot().latencyMs).toBe(420); // speech_stopped → first audio played
    finishReply(s);
    expect(player.ended).toEqual(["item_r"]);
    expect(client.phase).toBe("speaking"); // still playing what was received
    client.playbackFinished("item_r");
    client.playbackDrained();
    expect(client.phase).toBe("listening");
    expect(client.getSnapshot().transcript[1].status).toBe("done");
  });

  it("shows the person speaking while the server hears speech", () => {
    const client = makeClient();
    const s = connect(client);
    s.receive({ type: "input_audio_buffer.speech_started", item_id: "item_u", audio_start_ms: 0 });
    expect(client.getSnapshot().userSpeaking).toBe(true);
    expect(client.getSnapshot().transcript).toEqual([{ id: "item_u", role: "user", text: "", status: "pending" }]);
    s.receive({ type: "input_audio_buffer.speech_stopped", item_id: "item_u", audio_end_ms: 900 });
    expect(client.getSnapshot().userSpeaking).toBe(false);
    expect(client.phase).toBe("thinking");
  });

  it("stays thinking while a reply that is complete waits for its pre-roll", () => {
    const client = makeClient();
    const s = connect(client);
    turnAndReply(s, 1);
    finishReply(s);
    expect(client.phase).toBe("thinking");
    client.playbackStarted("item_r");
    expect(client.phase).toBe("speaking");
  });

  it("a typed turn creates an item and asks for a response; latency counts from the send", async () => {
    const client = makeClient();
    const s = connect(client);
    expect(await client.sendText("  hi there  ")).toBe(true);
    expect(s.sent.slice(-2)).toEqual([
      { type: "conversation.item.create", item: { type: "message", role: "user", content: [{ type: "input_text", text: "hi there" }] } }, // no id: the server makes them
      { type: "response.create" },
    ]);
    expect(client.phase).toBe("thinking");
    expect(client.getSnapshot().transcript.at(-1)).toMatchObject({ role: "user", text: "hi there", typed: true });
    clock.advance(300);
    s.receive({ type: "response.created", response: { id: "resp_9" } });
    s.receive({ type: "response.output_audio.delta", response_id: "resp_9", item_id: "item_9", delta: audio(1920) });
    clock.advance(200);
    client.playbackStarted("item_9", 25); // the output's own latency counts too
    expect(client.getSnapshot().latencyMs).toBe(525);
  });

  it("refuses empty text and text before the session", async () => {
    const client = makeClient();
    client.start();
    expect(await client.sendText("hello")).toBe(false);
    last().open();
    last().receive({ type: "session.created", session: {} });
    expect(await client.sendText("   ")).toBe(false);
  });

  it("a server error becomes a notice and the conversation goes on; a failed reply too", () => {
    const client = makeClient();
    const s = connect(client);
    s.receive({ type: "error", error: { type: "invalid_request_error", code: "rate_limited", message: "slow down" } });
    expect(client.getSnapshot().notice).toMatchObject({ code: "rate_limited", message: "slow down" });
    expect(client.phase).toBe("listening");
    turnAndReply(s, 0);
    s.receive({
      type: "response.done",
      response: { id: "resp_1", status: "failed", status_details: { type: "failed", error: { code: "response_failed", message: "replica died" } } },
    });
    expect(client.getSnapshot().notice).toMatchObject({ code: "response_failed", message: "replica died" });
    expect(client.phase).toBe("listening");
    expect(client.getSnapshot().transcript.at(-1)?.status).toBe("failed");
  });
});

describe("RealtimeClient: barge-in and truncation", () => {
  it("speech during a reply flushes the player and truncates the item to what was played", async () => {
    const client = makeClient();
    const s = connect(client);
    turnAndReply(s, 20); // 3.2 s received
    client.playbackStarted("item_r");
    player.flushResult = { item_r: 36_012 }; // 1500.5 ms played
    s.receive({ type: "input_audio_buffer.speech_started", item_id: "item_u2", audio_start_ms: 4000 });
    expect(client.phase).toBe("listening");
    await settle();
    expect(player.flushes).toBe(1);
    expect(s.sent.at(-1)).toEqual({ type: "conversation.item.truncate", item_id: "item_r", content_index: 0, audio_end_ms: 1500 });
    expect(s.types()).not.toContain("response.cancel"); // the server's VAD already cancelled it
    expect(client.debug.truncates).toEqual([{ itemId: "item_r", audioEndMs: 1500, reason: "barge-in" }]);
    // Audio still in flight for the interrupted reply is dropped.
    const before = player.pushed.length;
    s.receive({ type: "response.output_audio.delta", response_id: "resp_1", item_id: "item_r", delta: audio(3840) });
    expect(player.pushed.length).toBe(before);
    finishReply(s, "cancelled");
    expect(player.ended).toEqual([]);
    expect(client.getSnapshot().transcript.find((e) => e.id === "item_r")?.status).toBe("interrupted");
    s.receive({ type: "conversation.item.truncated", item_id: "item_r", content_index: 0, audio_end_ms: 1500 });
    expect(client.debug.truncated).toEqual([{ itemId: "item_r", audioEndMs: 1500 }]);
  });

  it("also truncates a reply that finished generating but is still playing", async () => {
    const { s } = replyPlaying(10, true);
    player.flushResult = { item_r: 24_000 };
    await bargeIn(s);
    expect(s.sent.at(-1)).toEqual({ type: "conversation.item.truncate", item_id: "item_r", content_index: 0, audio_end_ms: 1000 });
  });

  it("does not truncate a reply that was played to its end", async () => {
    const { client, s } = replyPlaying(2, true);
    client.playbackFinished("item_r");
    client.playbackDrained();
    await bargeIn(s);
    expect(player.flushes).toBe(0);
    expect(s.types()).not.toContain("conversation.item.truncate");
  });

  it("speech before any reply audio drops the reply without a truncate", async () => {
    const client = makeClient();
    const s = connect(client);
    turnAndReply(s, 0);
    await bargeIn(s);
    expect(s.types()).not.toContain("conversation.item.truncate");
    s.receive({ type: "response.output_audio.delta", response_id: "resp_1", item_id: "item_r", delta: audio(1920) });
    expect(player.pushed).toEqual([]);
  });

  it("typing during a reply cancels it, truncates it, and asks for the new reply once the old one is done", async () => {
    const { client, s } = replyPlaying(20);
    player.flushResult = { item_r: 12_000 };
    await client.sendText("stop, tell me something else");
    expect(s.types().slice(-3)).toEqual(["response.cancel", "conversation.item.truncate", "conversation.item.create"]);
    expect(s.sent.find((e) => e.type === "response.cancel")).toEqual({ type: "response.cancel", response_id: "resp_1" });
    expect(s.sent.find((e) => e.type === "conversation.item.truncate")).toMatchObject({ item_id: "item_r", audio_end_ms: 500 });
    expect(s.types()).not.toContain("response.create"); // not while the old response runs
    finishReply(s, "cancelled");
    expect(s.types().at(-1)).toBe("response.create");
    expect(client.phase).toBe("thinking");
  });

  it("ending the call mid-reply cancels, truncates, then closes normally without reconnecting", async () => {
    const { client, s } = replyPlaying(20);
    player.flushResult = { item_r: 4800 };
    await client.stop();
    expect(s.types().slice(-2)).toEqual(["response.cancel", "conversation.item.truncate"]);
    expect(s.sent.at(-1)).toMatchObject({ audio_end_ms: 200 });
    expect(s.closedWith).toEqual({ code: 1000, reason: "call ended" });
    expect(client.phase).toBe("idle");
    s.drop(1000);
    clock.advance(60_000);
    expect(sockets).toHaveLength(1);
  });

});

describe("RealtimeClient: the connection and the end of a call", () => {
  it("shows the connection's retries, its failures and the server's endings", () => {
    const client = makeClient();
    connect(client, { conversation_id: "conv_server" });
    expect(client.getSnapshot().conversationId).toBe("conv_server");
    last().drop(1006);
    expect(client.phase).toBe("reconnecting");
    expect(client.getSnapshot().reconnect).toEqual({ attempt: 1, max: 5, delayMs: 500 });
    clock.advance(500);
    last().drop(1008, "unauthorized");
    expect(client.phase).toBe("error");
    expect(client.getSnapshot().failure).toEqual({ kind: "auth", message: "unauthorized" });
    expect(client.getSnapshot().reconnect).toBeNull();
    client.retry();
    last().open();
    last().receive({ type: "session.created", session: {} });
    expect(client.phase).toBe("listening");
    last().drop(4001, "taken over");
    expect(client.phase).toBe("idle");
    expect(client.getSnapshot().notice?.message).toMatch(/another tab/);
  });

  it("a normal close by the server ends the call with a notice", () => {
    const client = makeClient();
    const s = connect(client);
    s.drop(1000, "idle");
    expect(client.phase).toBe("idle");
    expect(client.getSnapshot().notice?.message).toMatch(/ended the conversation/);
    clock.advance(60_000);
    expect(sockets).toHaveLength(1);
  });

  it("a lost connection silences what was playing", () => {
    const client = makeClient();
    const s = connect(client);
    turnAndReply(s, 5);
    client.playbackStarted("item_r");
    s.drop(1006);
    expect(player.flushes).toBe(1);
    expect(client.phase).toBe("reconnecting");
  });

  it("retry after a failure resumes the same conversation", () => {
    const client = makeClient();
    connect(client, { conversation_id: "conv_keep" });
    last().drop(1008);
    client.retry();
    expect(new URL(last().url).searchParams.get("conversation_id")).toBe("conv_keep");
    client.start();
    expect(new URL(last().url).searchParams.has("conversation_id")).toBe(false); // a new one
  });

  it("a microphone failure ends the call and shows it", () => {
    const client = makeClient();
    const s = connect(client);
    client.fail("mic-denied", "Microphone access was blocked.");
    expect(client.phase).toBe("error");
    expect(client.getSnapshot().failure?.kind).toBe("mic-denied");
    expect(s.closedWith?.code).toBe(1000);
    clock.advance(60_000);
    expect(sockets).toHaveLength(1);
  });

  it("a failure mid-reply leaves nothing of that reply to play or truncate in the next call", async () => {
    const client = makeClient();
    const s = connect(client);
    turnAndReply(s, 5);
    client.playbackStarted("item_r");
    client.fail("mic-missing", "The microphone stopped.");
    client.retry();
    const next = last();
    next.open();
    next.receive({ type: "session.created", session: {} });
    expect(client.phase).toBe("listening"); // not "thinking" about the last call's unplayed audio
    next.receive({ type: "input_audio_buffer.speech_started", item_id: "item_u2", audio_start_ms: 0 });
    await settle();
    expect(next.types()).not.toContain("conversation.item.truncate");
  });
});
