import { beforeEach, describe, expect, it } from "vitest";
import { Connection, type ConnectionOptions } from "../lib/connection";
import { pcm16ToBase64 } from "../lib/pcm";
import { Clock, type FakeSocket, fakeEndpoint, settle } from "./fakes";

let sockets: FakeSocket[];
let clock: Clock;
/** What the connection told the call, in order. */
let told: string[];

function makeConnection(options: Partial<ConnectionOptions> = {}): Connection {
  const connection: Connection = new Connection({
    ...fakeEndpoint(sockets, clock),
    policy: { maxAttempts: 5, baseDelayMs: 500, maxDelayMs: 8000 },
    counters: { sent: {}, droppedAudioChunks: 0, connects: 0 },
    events: {
      message: (event) => {
        if (connection.serverEvent(event)) told.push(event.type);
      },
      lost: () => told.push("lost"),
      ended: (notice) => told.push(`ended: ${notice}`),
      failed: (kind, message) => told.push(`failed ${kind}: ${message}`),
      changed: () => {},
    },
    ...options,
  });
  return connection;
}

const last = () => sockets[sockets.length - 1];

/** Let `n` reconnect attempts fail as they come (each new socket drops): the delays waited before each. */
function dropEachRetry(connection: Connection, n: number): number[] {
  const delays: number[] = [];
  for (let k = 0; k < n; k++) {
    delays.push(connection.reconnect!.delayMs);
    clock.advance(delays[k]);
    last().drop(1006);
  }
  return delays;
}

function connect(connection: Connection, info: Record<string, unknown> = {}): FakeSocket {
  connection.start(false);
  const s = last();
  s.open();
  s.receive({ type: "session.created", session: {} });
  s.receive({ type: "x-server.info", voices: ["none"], default_voice: "none", random_weights: true, max_reply_seconds: 6, ...info });
  return s;
}

beforeEach(() => {
  sockets = [];
  clock = new Clock();
  told = [];
});

describe("Connection: the socket", () => {
  it("is connecting until the session exists, then open; passes the server's events on", () => {
    const connection = makeConnection();
    connection.start(false);
    expect(connection.status).toBe("connecting");
    last().open();
    expect(connection.ready).toBe(false);
    last().receive({ type: "session.created", session: {} });
    expect(connection.status).toBe("open");
    expect(told).toEqual(["session.created"]);
  });

  it("sends microphone audio as base64 appends once ready, keeping up to 1 s spoken while connecting", () => {
    const connection = makeConnection();
    connection.start(false);
    for (let k = 0; k < 30; k++) connection.sendAudio(new Int16Array(960).fill(k));
    last().open();
    last().receive({ type: "session.created", session: {} });
    const appends = last().sent.filter((e) => e.type === "input_audio_buffer.append");
    expect(appends).toHaveLength(25);
    expect(appends[0].audio).toBe(pcm16ToBase64(new Int16Array(960).fill(5)));
    connection.sendAudio(new Int16Array(960));
    expect(last().sent.filter((e) => e.type === "input_audio_buffer.append")).toHaveLength(26);
  });

  it("numbers every event it sends, from 1 on each new socket", () => {
    const connection = makeConnection();
    const s = connect(connection);
    connection.send({ type: "input_audio_buffer.clear" });
    connection.send({ type: "response.create" });
    expect(s.seqs).toEqual([1, 2]);
    s.drop(1006);
    clock.advance(500);
    const again = last();
    again.open();
    again.receive({ type: "session.created", session: {} });
    connection.send({ type: "response.create" });
    expect(again.seqs.at(-1)).toBe(again.seqs.length);
    expect(again.seqs[0]).toBe(1);
  });

  it("drops microphone audio while the socket is backed up", () => {
    const counters = { sent: {}, droppedAudioChunks: 0, connects: 0 };
    const connection = makeConnection({ counters });
    const s = connect(connection);
    s.bufferedAmount = 1024 * 1024;
    connection.sendAudio(new Int16Array(960));
    expect(s.types()).not.toContain("input_audio_buffer.append");
    expect(counters.droppedAudioChunks).toBe(1);
  });

  it("ignores a replaced socket's late events and closes", () => {
    const connection = makeConnection();
    const old = connect(connection);
    connection.start(false);
    expect(old.closedWith).toEqual({ code: 1000, reason: "restart" });
    told = [];
    old.receive({ type: "session.created", session: {} });
    old.drop(1006);
    expect(told).toEqual([]);
    expect(connection.status).toBe("connecting");
  });

  it("hangs up without closing, so what is left can still be sent; then closes normally", () => {
    const connection = makeConnection();
    const s = connect(connection);
    connection.hangUp();
    expect(connection.inCall).toBe(false);
    expect(connection.send({ type: "response.create" })).toBe(true);
    connection.close("call ended");
    expect(s.closedWith).toEqual({ code: 1000, reason: "call ended" });
    expect(connection.send({ type: "response.create" })).toBe(false);
  });

  it("an unauthorized error ends the call as an auth failure", () => {
    const connection = makeConnection();
    const s = connect(connection);
    s.receive({ type: "error", error: { type: "invalid_request_error", code: "unauthorized", message: "bad token" } });
    expect(told.at(-1)).toBe("failed auth: bad token");
    expect(connection.status).toBe("idle");
    expect(s.closedWith?.code).toBe(1000);
  });
});

describe("Connection: reconnect", () => {
  it("reconnects after an unexpected close with exponential backoff, resuming the conversation", () => {
    const connection = makeConnection();
    const s = connect(connection, { conversation_id: "conv_server" });
    s.drop(1006);
    expect(told.at(-1)).toBe("lost");
    expect(connection.status).toBe("reconnecting");
    expect(connection.reconnect).toEqual({ attempt: 1, max: 5, delayMs: 500 });
    clock.advance(499);
    expect(sockets).toHaveLength(1);
    clock.advance(1);
    expect(sockets).toHaveLength(2);
    expect(new URL(last().url).searchParams.get("conversation_id")).toBe("conv_server");
    last().drop(1006); // the handshake fails too
    expect(connection.reconnect?.delayMs).toBe(1000);
    clock.advance(1000);
    last().open();
    last().receive({ type: "session.created", session: {} });
    expect(connection.status).toBe("open");
    expect(connection.reconnect).toBeNull();
    // A later drop starts from the first delay again.
    last().drop(1011);
    expect(connection.reconnect).toEqual({ attempt: 1, max: 5, delayMs: 500 });
  });

  it("gives up after the bounded number of attempts and names the server as down", () => {
    const connection = makeConnection();
    const s = connect(connection);
    s.drop(1006);
    const delays = dropEachRetry(connection, 5);
    expect(delays).toEqual([500, 1000, 2000, 4000, 8000]);
    expect(sockets).toHaveLength(6);
    expect(told.at(-1)).toMatch(/^failed server-down: Can't reach the server/);
    expect(connection.status).toBe("idle");
    clock.advance(120_000);
    expect(sockets).toHaveLength(6);
    expect(clock.pending).toBe(0);
  });

  it("caps the delay at maxDelayMs and jitters it", () => {
    const connection = makeConnection({ policy: { maxAttempts: 8, baseDelayMs: 500, maxDelayMs: 3000 }, random: () => 1 });
    const s = connect(connection);
    s.drop(1006);
    const delays = dropEachRetry(connection, 6);
    expect(delays).toEqual([625, 1250, 2500, 3750, 3750, 3750]); // ×1.25 at the top of the jitter
  });

  it("never reconnects after 1008 (the token was refused)", () => {
    const connection = makeConnection();
    connection.start(false);
    last().open();
    last().drop(1008, "unauthorized");
    expect(told).toEqual(["lost", "failed auth: unauthorized"]);
    clock.advance(60_000);
    expect(sockets).toHaveLength(1);
  });

  it.each([
    ["auth", "a live server means the token was refused: no retry", /^failed auth:/, 1],
    ["down", "the server is down: retried", undefined, 2],
  ] as const)("asks why a first handshake failed (%s): %s", async (refusal, _why, failure, attempts) => {
    const connection = makeConnection({ diagnoseRefusal: async () => refusal });
    connection.start(false);
    last().drop(1006);
    expect(connection.status).toBe("connecting");
    await settle();
    if (failure) expect(told.at(-1)).toMatch(failure);
    else expect(connection.status).toBe("reconnecting");
    clock.advance(60_000);
    expect(sockets).toHaveLength(attempts);
  });

  it("a busy server (1013) is retried, and named when the attempts run out", () => {
    const connection = makeConnection({ policy: { maxAttempts: 2, baseDelayMs: 500, maxDelayMs: 8000 } });
    connection.start(false);
    for (let k = 0; k < 3; k++) {
      last().open();
      last().receive({ type: "error", error: { type: "server_error", code: "server_busy", message: "at capacity" } });
      last().drop(1013, "server busy");
      clock.advance(10_000);
    }
    expect(sockets).toHaveLength(3);
    expect(told).not.toContain("error"); // before a session, server_busy is the connection's alone
    expect(told.at(-1)).toMatch(/^failed busy:/);
  });

  it("does not reconnect when a newer connection took the conversation over", () => {
    const connection = makeConnection();
    connect(connection, { conversation_id: "conv_mine" });
    last().drop(4001, "taken over");
    clock.advance(60_000);
    expect(sockets).toHaveLength(1); // no new socket: it would take the conversation back
    expect(told.at(-1)).toMatch(/^ended: .*another tab/);
    expect(connection.status).toBe("idle");
  });

  it("a reconnect and a resume present the token configured since the call began (a refreshed sign-in)", () => {
    const connection = makeConnection();
    const s = connect(connection, { conversation_id: "conv_tok" });
    expect(new URL(s.url).searchParams.get("token")).toBe("s3cret");
    connection.configure("ws://127.0.0.1:9999/v1/realtime", "renewed-1");
    expect(sockets).toHaveLength(1); // the open socket is kept
    s.drop(1006);
    clock.advance(500);
    expect(new URL(last().url).searchParams.get("token")).toBe("renewed-1");
    expect(new URL(last().url).searchParams.get("conversation_id")).toBe("conv_tok");
    last().drop(1008);
    connection.configure("ws://127.0.0.1:9999/v1/realtime", "renewed-2");
    connection.start(true);
    expect(new URL(last().url).searchParams.get("token")).toBe("renewed-2");
    connection.configure("ws://127.0.0.1:9999/v1/realtime", "");
    connection.start(false);
    expect(new URL(last().url).searchParams.has("token")).toBe(false); // signed out: no token at all
  });

  it("a resumed call keeps the conversation id; a new one has none", () => {
    const connection = makeConnection();
    connect(connection, { conversation_id: "conv_keep" });
    last().drop(1008);
    connection.start(true);
    expect(new URL(last().url).searchParams.get("conversation_id")).toBe("conv_keep");
    connection.start(false);
    expect(new URL(last().url).searchParams.has("conversation_id")).toBe(false); // a new one
  });
});
