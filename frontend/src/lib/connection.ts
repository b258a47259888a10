/**
 * One call's WebSocket: open it, send on it, and when it closes decide whether to try again.
 *
 * - An unexpected close is retried with exponential backoff (with jitter), at most `maxAttempts` times in
 *   a row, resuming the same conversation (`conversation_id`, which the server makes and announces in
 *   `x-server.info`). A session resets the count.
 * - Never retried: 1008 (the token was refused), 4001 (a newer connection took the conversation over:
 *   taking it back would start a tug of war between tabs), and a normal close by the server.
 * - A socket that never opened is a refused handshake, which a browser cannot tell apart from a server
 *   that is down: `diagnoseRefusal` (the page asks `/healthz` when it can) decides.
 * - Microphone audio spoken before the first session is kept (up to ~1 s) and sent once it exists.
 */

import { pcm16ToBase64 } from "./pcm";
import {
  CLOSE_NORMAL,
  CLOSE_POLICY,
  CLOSE_TAKEN_OVER,
  CLOSE_TRY_AGAIN_LATER,
  type ClientEvent,
  SEQ_FIELD,
  type ServerEvent,
} from "./protocol";
import { realtimeUrl } from "./config";
import type { ConnectionStatus, FailureKind } from "./viewState";

/** The part of the browser's WebSocket the client uses. */
export interface SocketLike {
  readonly readyState: number;
  readonly bufferedAmount?: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: Event) => unknown) | null;
  onmessage: ((ev: MessageEvent) => unknown) | null;
  onclose: ((ev: CloseEvent) => unknown) | null;
  onerror: ((ev: Event) => unknown) | null;
}

export interface Timers {
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(handle: unknown): void;
}

export interface ReconnectPolicy {
  maxAttempts: number;
  baseDelayMs: number;
  maxDelayMs: number;
}

export interface ReconnectInfo {
  attempt: number;
  max: number;
  delayMs: number;
}

export type Refusal = "auth" | "down" | "unknown";

/** What the connection tells the call. */
export interface ConnectionEvents {
  message(event: ServerEvent): void;
  /** The socket closed under the call: nothing it carried can be answered any more. */
  lost(): void;
  /** The server ended the call, or another tab took it over: `notice` says which. */
  ended(notice: string): void;
  /** The call cannot go on (see `Failure`); the connection has already stopped. */
  failed(kind: FailureKind, message: string): void;
  /** The status changed (a retry was scheduled, or a refused handshake is being diagnosed). */
  changed(): void;
}

export interface ConnectionCounters {
  sent: Record<string, number>;
  droppedAudioChunks: number;
  connects: number;
}

export interface ConnectionOptions {
  endpoint: string;
  token: string;
  createSocket: (url: string) => SocketLike;
  timers: Timers;
  random: () => number;
  policy: ReconnectPolicy;
  /** Why did a handshake fail? "auth" stops retrying (the token was refused). */
  diagnoseRefusal?: () => Promise<Refusal>;
  counters: ConnectionCounters;
  events: ConnectionEvents;
}

const OPEN = 1;
const PRECONNECT_CHUNKS = 25; // up to ~1 s of 40 ms chunks spoken before the first session is ready
const MAX_BUFFERED_BYTES = 512 * 1024;

export class Connection {
  private endpoint: string;
  private token: string;
  private readonly options: ConnectionOptions;
  private readonly events: ConnectionEvents;
  private ws: SocketLike | null = null;
  private sentOnSocket = 0; // the last event number (`x-seq`) on the current socket
  private running = false; // a call is on: a close is retried
  private session = false; // session.created seen on the current socket
  private hadSession = false; // any session in this call (the pre-connect buffer is for the first only)
  private attempts = 0;
  private retryTimer: unknown = null;
  private reconnectInfo: ReconnectInfo | null = null;
  private lastCloseBusy = false;
  private conversationId: string | null = null;
  private preconnect: Int16Array[] = [];

  constructor(options: ConnectionOptions) {
    this.options = options;
    this.events = options.events;
    this.endpoint = options.endpoint;
    this.token = options.token;
  }

  get status(): ConnectionStatus {
    if (!this.running) return "idle";
    if (this.reconnectInfo !== null) return "reconnecting";
    return this.session ? "open" : "connecting";
  }

  /** A call is on (connected, or about to be). */
  get inCall(): boolean {
    return this.running;
  }

  /** The current socket has a session: what is sent on it is heard. */
  get ready(): boolean {
    return this.session;
  }

  get reconnect(): ReconnectInfo | null {
    return this.reconnectInfo;
  }

  get conversation(): string | null {
    return this.conversationId;
  }

  /** Where the next connection goes; a running call keeps its socket. */
  configure(endpoint: string, token: string): void {
    this.endpoint = endpoint;
    this.token = token;
  }

  /** Start a call: a new conversation, or (`resume`) the last one again. */
  start(resume: boolean): void {
    this.clearRetry();
    this.closeSocket(CLOSE_NORMAL, "restart");
    if (!resume) this.conversationId = null; // the server makes the id (x-server.info)
    this.running = true;
    this.attempts = 0;
    this.reconnectInfo = null;
    this.hadSession = false;
    this.preconnect = [];
    this.lastCloseBusy = false;
    this.connect();
  }

  /** End the call but keep the socket: what is still to send (truncates) goes out before `close`. */
  hangUp(): void {
    this.running = false;
    this.reconnectInfo = null;
    this.clearRetry();
  }

  close(reason: string): void {
    this.hangUp();
    this.closeSocket(CLOSE_NORMAL, reason);
  }

  send(event: ClientEvent): boolean {
    const ws = this.ws;
    if (ws === null || ws.readyState !== OPEN) return false;
    ws.send(JSON.stringify({ ...event, [SEQ_FIELD]: ++this.sentOnSocket }));
    this.options.counters.sent[event.type] = (this.options.counters.sent[event.type] ?? 0) + 1;
    return true;
  }

  /** One chunk of the microphone; dropped while the socket is backed up (late audio is no use). */
  sendAudio(pcm: Int16Array): void {
    if (!this.running) return;
    if (!this.session) {
      if (!this.hadSession) {
        this.preconnect.push(pcm);
        if (this.preconnect.length > PRECONNECT_CHUNKS) this.preconnect.shift();
      }
      return;
    }
    if ((this.ws?.bufferedAmount ?? 0) > MAX_BUFFERED_BYTES) {
      this.options.counters.droppedAudioChunks++;
      return;
    }
    this.send({ type: "input_audio_buffer.append", audio: pcm16ToBase64(pcm) });
  }

  /** Take what the connection needs from a server event; false when the event was only for it. */
  serverEvent(event: ServerEvent): boolean {
    switch (event.type) {
      case "session.created":
        this.session = true;
        this.hadSession = true;
        this.attempts = 0;
        this.reconnectInfo = null;
        this.lastCloseBusy = false;
        for (const pcm of this.preconnect.splice(0)) this.sendAudio(pcm);
        return true;
      case "x-server.info":
        if (event.conversation_id) this.conversationId = event.conversation_id;
        return true;
      case "error":
        if (event.error.code === "unauthorized") {
          this.fail("auth", event.error.message);
          return false;
        }
        if (event.error.code === "server_busy" && !this.session) {
          this.lastCloseBusy = true; // the close (1013) follows
          return false;
        }
        return true;
      default:
        return true;
    }
  }

  private connect(): void {
    const url = realtimeUrl(this.endpoint, { token: this.token, conversationId: this.conversationId ?? undefined });
    let ws: SocketLike;
    try {
      ws = this.options.createSocket(url);
    } catch (e) {
      this.fail("server-down", `Could not open ${this.endpoint}: ${(e as Error).message}`);
      return;
    }
    this.options.counters.connects++;
    this.ws = ws;
    this.sentOnSocket = 0; // a new socket is a new session: its events count from 1
    let opened = false;
    ws.onopen = () => {
      if (ws === this.ws) opened = true;
    };
    ws.onmessage = (e: MessageEvent) => {
      if (ws !== this.ws || typeof e.data !== "string") return;
      let event: ServerEvent;
      try {
        event = JSON.parse(e.data) as ServerEvent;
      } catch {
        return;
      }
      this.events.message(event);
    };
    ws.onerror = () => {}; // a close event always follows
    ws.onclose = (e: CloseEvent) => {
      if (ws === this.ws) this.closed(e.code, e.reason, opened);
    };
  }

  private closed(code: number, reason: string, opened: boolean): void {
    this.ws = null;
    this.session = false;
    this.events.lost();
    if (!this.running) {
      this.events.changed();
      return;
    }
    if (code === CLOSE_POLICY) {
      this.fail("auth", reason || "The server refused the connection (check the access token).");
      return;
    }
    if (code === CLOSE_TAKEN_OVER) {
      this.running = false;
      this.events.ended("This conversation is now open in another tab or window.");
      return;
    }
    if (code === CLOSE_NORMAL && opened) {
      this.running = false;
      this.events.ended(reason ? `The server ended the conversation (${reason}).` : "The server ended the conversation.");
      return;
    }
    if (code === CLOSE_TRY_AGAIN_LATER) this.lastCloseBusy = true;
    const diagnose = this.options.diagnoseRefusal;
    if (!opened && !this.hadSession && this.attempts === 0 && diagnose) {
      this.events.changed();
      diagnose().then(
        (why) => {
          if (!this.running || this.ws !== null) return;
          if (why === "auth") this.fail("auth", "The server refused the connection: check the access token.");
          else this.scheduleRetry();
        },
        () => this.running && this.scheduleRetry(),
      );
      return;
    }
    this.scheduleRetry();
  }

  private scheduleRetry(): void {
    const policy = this.options.policy;
    if (this.attempts >= policy.maxAttempts) {
      this.reconnectInfo = null;
      if (this.lastCloseBusy) this.fail("busy", "The server is at capacity. Try again in a little while.");
      else this.fail("server-down", `Can't reach the server at ${this.endpoint}.`);
      return;
    }
    this.attempts++;
    const exp = Math.min(policy.maxDelayMs, policy.baseDelayMs * 2 ** (this.attempts - 1));
    const delayMs = Math.round(exp * (0.75 + 0.5 * this.options.random()));
    this.reconnectInfo = { attempt: this.attempts, max: policy.maxAttempts, delayMs };
    this.retryTimer = this.options.timers.setTimeout(() => {
      this.retryTimer = null;
      if (this.running) this.connect();
    }, delayMs);
    this.events.changed();
  }

  private fail(kind: FailureKind, message: string): void {
    this.close("client failed");
    this.events.failed(kind, message);
  }

  private clearRetry(): void {
    if (this.retryTimer !== null) this.options.timers.clearTimeout(this.retryTimer);
    this.retryTimer = null;
  }

  private closeSocket(code: number, reason: string): void {
    const ws = this.ws;
    this.ws = null;
    this.session = false;
    if (ws === null) return;
    try {
      ws.close(code, reason);
    } catch {
      // already closing
    }
  }
}
