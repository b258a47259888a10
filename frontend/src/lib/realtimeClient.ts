/**
 * The page's side of the realtime protocol, free of Web Audio and React: one conversation over a
 * WebSocket, its visible state, and the rules of turn-taking.
 *
 * - States the person sees (`Phase`): connecting → listening ⇄ thinking → speaking → listening; plus
 *   reconnecting and error. They follow the server's events and what the player reports.
 * - Barge-in: when the server hears the person during a reply (`input_audio_buffer.speech_started`),
 *   or the person types or ends the call, the player is flushed and, for each reply item that had not
 *   been played to its end, `conversation.item.truncate` tells the server how much was actually heard
 *   (`audio_end_ms`), so its history matches what the person heard. Audio still in flight for an
 *   interrupted reply is dropped.
 * - Reconnect: an unexpected close is retried with exponential backoff (with jitter), at most
 *   `maxAttempts` times in a row, resuming the same conversation (`conversation_id`); never after 1008
 *   (the token was refused). A socket that never opened is a refused handshake, which a browser cannot
 *   tell apart from a server that is down: `diagnoseRefusal` (the page asks `/healthz` when it can)
 *   decides.
 * - Latency: from the end of the person's turn (`speech_stopped`, the commit, or a typed send) to the
 *   first reply audio the player actually played.
 */

import { base64ToPcm16, pcm16ToBase64 } from "./pcm";
import { CLOSE_NORMAL, CLOSE_POLICY, CLOSE_TAKEN_OVER, CLOSE_TRY_AGAIN_LATER, type ClientEvent, type ServerEvent, WIRE_RATE } from "./protocol";
import { realtimeUrl } from "./config";

export type Phase = "idle" | "connecting" | "listening" | "thinking" | "speaking" | "reconnecting" | "error";
export type FailureKind = "server-down" | "auth" | "busy" | "mic-denied" | "mic-missing" | "audio";

export interface Failure {
  kind: FailureKind;
  message: string;
}

export interface Notice {
  id: number;
  code: string;
  message: string;
}

export interface TranscriptEntry {
  id: string;
  role: "user" | "assistant";
  text: string;
  status: "pending" | "streaming" | "done" | "interrupted" | "failed";
  typed?: boolean;
}

export interface ClientSnapshot {
  phase: Phase;
  failure: Failure | null;
  userSpeaking: boolean;
  transcript: readonly TranscriptEntry[];
  voices: readonly string[];
  /** The voice the person picked, or null for the server's default. */
  voice: string | null;
  defaultVoice: string | null;
  randomWeights: boolean | null;
  maxReplySeconds: number | null;
  latencyMs: number | null;
  latencies: readonly number[];
  reconnect: { attempt: number; max: number; delayMs: number } | null;
  notice: Notice | null;
  conversationId: string | null;
}

/** What the client needs from the audio output (the playback worklet, or a fake in tests). */
export interface Player {
  push(itemId: string, pcm: Int16Array): void;
  end(itemId: string): void;
  /** Stop and drop what is queued; resolves to wire samples played per unfinished item. */
  flush(): Promise<Record<string, number>>;
}

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

export interface ClientOptions {
  endpoint: string;
  token?: string;
  voice?: string | null;
  createSocket?: (url: string) => SocketLike;
  timers?: Timers;
  now?: () => number;
  random?: () => number;
  newId?: (prefix: string) => string;
  reconnect?: Partial<ReconnectPolicy>;
  /** Why did a handshake fail? "auth" stops retrying (the token was refused). */
  diagnoseRefusal?: () => Promise<"auth" | "down" | "unknown">;
  /** How long to wait for the player's flush report before using the last progress. */
  flushTimeoutMs?: number;
}

export interface TruncateRecord {
  itemId: string;
  audioEndMs: number;
  reason: InterruptReason;
}

export type InterruptReason = "barge-in" | "typed" | "stop";

/** Counters for tests and debugging (`window.__csm`); not part of the rendered state. */
export interface ClientDebug {
  receivedByItem: Record<string, number>;
  playedByItem: Record<string, number>;
  truncates: TruncateRecord[];
  flushes: { reason: InterruptReason; played: Record<string, number> }[];
  truncated: { itemId: string; audioEndMs: number }[];
  events: string[];
  /** Server event types and player reports with the time they came (ms, the client's clock). */
  timeline: [number, string][];
  sent: Record<string, number>;
  droppedAudioChunks: number;
  connects: number;
}

const OPEN = 1;
const PRECONNECT_CHUNKS = 25; // up to ~1 s of 40 ms chunks spoken before the first session is ready
const MAX_BUFFERED_BYTES = 512 * 1024;
const MAX_EVENTS_KEPT = 1000;

function randomHex(bytes: number): string {
  const a = new Uint8Array(bytes);
  if (globalThis.crypto?.getRandomValues) globalThis.crypto.getRandomValues(a);
  else for (let i = 0; i < bytes; i++) a[i] = Math.floor(Math.random() * 256);
  return [...a].map((b) => b.toString(16).padStart(2, "0")).join("");
}

interface ItemAudio {
  received: number;
  audioDone: boolean;
  finished: boolean;
  dropped: boolean;
}

export class RealtimeClient {
  readonly debug: ClientDebug = {
    receivedByItem: {},
    playedByItem: {},
    truncates: [],
    flushes: [],
    truncated: [],
    events: [],
    timeline: [],
    sent: {},
    droppedAudioChunks: 0,
    connects: 0,
  };

  private endpoint: string;
  private token: string;
  private readonly createSocket: (url: string) => SocketLike;
  private readonly timers: Timers;
  private readonly now: () => number;
  private readonly random: () => number;
  private readonly newId: (prefix: string) => string;
  private readonly policy: ReconnectPolicy;
  private readonly diagnoseRefusal?: () => Promise<"auth" | "down" | "unknown">;
  private readonly flushTimeoutMs: number;
  private player: Player | null = null;
  private readonly listeners = new Set<() => void>();
  private snapshot: ClientSnapshot;

  // Connection.
  private ws: SocketLike | null = null;
  private running = false;
  private ready = false; // session.created seen on the current socket
  private hadSession = false; // any session in this call (the pre-connect buffer is for the first only)
  private attempts = 0;
  private retryTimer: unknown = null;
  private reconnectInfo: ClientSnapshot["reconnect"] = null;
  private lastCloseBusy = false;
  private failure: Failure | null = null;
  private conversationId: string | null = null;
  private preconnect: Int16Array[] = [];

  // Conversation.
  private response: { id: string; itemId: string | null } | null = null;
  private readonly droppedResponses = new Set<string>();
  private readonly items = new Map<string, ItemAudio>();
  private awaitingReply = false;
  private pendingCreate = false;
  private playing = false;
  private userSpeaking = false;
  private turnEndAt: number | null = null;
  private transcript: TranscriptEntry[] = [];
  private latencies: number[] = [];
  private voices: string[] = [];
  private voice: string | null;
  private defaultVoice: string | null = null;
  private randomWeights: boolean | null = null;
  private maxReplySeconds: number | null = null;
  private notice: Notice | null = null;
  private noticeSeq = 0;

  constructor(options: ClientOptions) {
    this.endpoint = options.endpoint;
    this.token = options.token ?? "";
    this.voice = options.voice ?? null;
    this.createSocket = options.createSocket ?? ((url) => new WebSocket(url) as SocketLike);
    this.timers = options.timers ?? {
      setTimeout: (fn, ms) => globalThis.setTimeout(fn, ms),
      clearTimeout: (h) => globalThis.clearTimeout(h as ReturnType<typeof setTimeout>),
    };
    this.now = options.now ?? (() => performance.now());
    this.random = options.random ?? Math.random;
    this.newId = options.newId ?? ((prefix) => `${prefix}_${randomHex(10)}`);
    this.policy = { maxAttempts: 5, baseDelayMs: 500, maxDelayMs: 8000, ...options.reconnect };
    this.diagnoseRefusal = options.diagnoseRefusal;
    this.flushTimeoutMs = options.flushTimeoutMs ?? 500;
    this.snapshot = this.buildSnapshot();
  }

  // ---- the outside world ------------------------------------------------------------------------

  subscribe = (listener: () => void): (() => void) => {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  };

  getSnapshot = (): ClientSnapshot => this.snapshot;

  get phase(): Phase {
    return this.snapshot.phase;
  }

  setPlayer(player: Player | null): void {
    this.player = player;
  }

  /** Change where the next connection goes (settings panel); a running call keeps its socket. */
  configure(endpoint: string, token: string): void {
    this.endpoint = endpoint;
    this.token = token;
  }

  /** Start a new conversation. */
  start(): void {
    this.transcript = [];
    this.latencies = [];
    this.conversationId = null; // the server makes the id (x-server.info); a reconnect resumes it
    this.begin();
  }

  /** After a failure: try again, resuming the same conversation. */
  retry(): void {
    this.begin();
  }

  /** The microphone (or audio) could not be used: show it, and end the call. */
  fail(kind: FailureKind, message: string): void {
    if (this.failure !== null && !this.running) return; // the first failure is the one to show
    this.failure = { kind, message };
    this.running = false;
    this.clearRetry();
    this.closeSocket(CLOSE_NORMAL, "client failed");
    this.resetTurnState();
    this.emit();
  }

  /** End the call: what was playing is flushed and truncated, then the socket closes normally. */
  async stop(): Promise<void> {
    if (!this.running) {
      if (this.failure !== null) {
        this.failure = null;
        this.emit();
      }
      return;
    }
    this.running = false;
    this.clearRetry();
    if (this.ready && (this.response !== null || this.hasUnfinishedAudio())) await this.interrupt("stop", true);
    this.closeSocket(CLOSE_NORMAL, "call ended");
    this.resetTurnState();
    this.emit();
  }

  /** Clear the failure screen without connecting. */
  dismissFailure(): void {
    this.failure = null;
    this.emit();
  }

  /** One chunk of the microphone at 24 kHz (from the capture worklet). */
  appendAudio(pcm: Int16Array): void {
    if (!this.running) return;
    if (!this.ready) {
      if (!this.hadSession) {
        this.preconnect.push(pcm);
        if (this.preconnect.length > PRECONNECT_CHUNKS) this.preconnect.shift();
      }
      return;
    }
    if ((this.ws?.bufferedAmount ?? 0) > MAX_BUFFERED_BYTES) {
      this.debug.droppedAudioChunks++;
      return;
    }
    this.send({ type: "input_audio_buffer.append", audio: pcm16ToBase64(pcm) });
  }

  /** A typed turn: interrupts a reply in progress, then asks for a spoken answer. */
  async sendText(text: string): Promise<boolean> {
    const clean = text.trim();
    if (!clean || !this.ready) return false;
    if (this.response !== null || this.hasUnfinishedAudio()) await this.interrupt("typed", true);
    if (!this.ready) return false;
    const id = this.newId("item");
    this.transcript = [...this.transcript, { id, role: "user", text: clean, status: "done", typed: true }];
    this.send({
      type: "conversation.item.create",
      // No item id: the server makes them (ours stays the transcript entry's, on this page only).
      item: { type: "message", role: "user", content: [{ type: "input_text", text: clean }] },
    });
    this.turnEndAt = this.now();
    this.awaitingReply = true;
    if (this.response !== null) this.pendingCreate = true; // sent when the cancelled reply is done
    else this.send({ type: "response.create" });
    this.emit();
    return true;
  }

  setVoice(voice: string | null): void {
    this.voice = voice;
    if (this.ready) this.sendVoice();
    this.emit();
  }

  dismissNotice(id: number): void {
    if (this.notice?.id === id) {
      this.notice = null;
      this.emit();
    }
  }

  // ---- what the player reports ------------------------------------------------------------------

  /** The player rendered the item's first frame; it reaches the ears `outputLatencyMs` later. */
  playbackStarted(itemId: string, outputLatencyMs = 0): void {
    this.mark(`player.started ${itemId}`);
    if (this.items.get(itemId)?.dropped) return;
    this.playing = true;
    if (this.turnEndAt !== null) {
      this.latencies = [...this.latencies.slice(-19), Math.round(this.now() + outputLatencyMs - this.turnEndAt)];
      this.turnEndAt = null;
    }
    this.emit();
  }

  playbackFinished(itemId: string): void {
    const item = this.items.get(itemId);
    if (item) item.finished = true;
    if (this.transcriptEntry(itemId)?.status === "streaming" && this.response?.itemId !== itemId) {
      this.updateEntry(itemId, { status: "done" });
    }
    this.emit();
  }

  playbackDrained(): void {
    this.mark("player.drained");
    if (!this.playing) return;
    this.playing = false;
    this.emit();
  }

  playbackProgress(items: { itemId: string; played: number }[]): void {
    for (const { itemId, played } of items) this.debug.playedByItem[itemId] = played;
  }

  private mark(what: string): void {
    const timeline = this.debug.timeline;
    if (timeline.length >= MAX_EVENTS_KEPT) timeline.splice(0, timeline.length - MAX_EVENTS_KEPT + 1);
    if (what !== "response.output_audio.delta" || timeline.at(-1)?.[1] !== what) timeline.push([Math.round(this.now()), what]);
  }

  // ---- connection -------------------------------------------------------------------------------

  private begin(): void {
    this.clearRetry();
    this.closeSocket(CLOSE_NORMAL, "restart");
    this.running = true;
    this.failure = null;
    this.attempts = 0;
    this.reconnectInfo = null;
    this.hadSession = false;
    this.preconnect = [];
    this.lastCloseBusy = false;
    this.playing = false;
    this.resetTurnState();
    this.connect();
    this.emit();
  }

  private connect(): void {
    const url = realtimeUrl(this.endpoint, { token: this.token, conversationId: this.conversationId ?? undefined });
    let ws: SocketLike;
    try {
      ws = this.createSocket(url);
    } catch (e) {
      this.fail("server-down", `Could not open ${this.endpoint}: ${(e as Error).message}`);
      return;
    }
    this.debug.connects++;
    this.ws = ws;
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
      this.handle(event);
    };
    ws.onerror = () => {}; // a close event always follows
    ws.onclose = (e: CloseEvent) => {
      if (ws === this.ws) this.closed(e.code, e.reason, opened);
    };
  }

  private closed(code: number, reason: string, opened: boolean): void {
    this.ws = null;
    this.ready = false;
    this.dropAllAudio();
    this.resetTurnState();
    if (!this.running) {
      this.emit();
      return;
    }
    if (code === CLOSE_POLICY) {
      this.fail("auth", reason || "The server refused the connection (check the access token).");
      return;
    }
    if (code === CLOSE_TAKEN_OVER) {
      // Reconnecting would take the conversation back from the newer tab, which would take it back...
      this.running = false;
      this.showNotice("closed", "This conversation is now open in another tab or window.");
      this.emit();
      return;
    }
    if (code === CLOSE_NORMAL && opened) {
      this.running = false;
      this.showNotice("closed", reason ? `The server ended the conversation (${reason}).` : "The server ended the conversation.");
      this.emit();
      return;
    }
    if (code === CLOSE_TRY_AGAIN_LATER) this.lastCloseBusy = true;
    if (!opened && !this.hadSession && this.attempts === 0 && this.diagnoseRefusal) {
      this.emit();
      this.diagnoseRefusal().then(
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
    if (this.attempts >= this.policy.maxAttempts) {
      this.reconnectInfo = null;
      if (this.lastCloseBusy) this.fail("busy", "The server is at capacity. Try again in a little while.");
      else this.fail("server-down", `Can't reach the server at ${this.endpoint}.`);
      return;
    }
    this.attempts++;
    const exp = Math.min(this.policy.maxDelayMs, this.policy.baseDelayMs * 2 ** (this.attempts - 1));
    const delayMs = Math.round(exp * (0.75 + 0.5 * this.random()));
    this.reconnectInfo = { attempt: this.attempts, max: this.policy.maxAttempts, delayMs };
    this.retryTimer = this.timers.setTimeout(() => {
      this.retryTimer = null;
      if (this.running) this.connect();
    }, delayMs);
    this.emit();
  }

  private clearRetry(): void {
    if (this.retryTimer !== null) this.timers.clearTimeout(this.retryTimer);
    this.retryTimer = null;
  }

  private closeSocket(code: number, reason: string): void {
    const ws = this.ws;
    this.ws = null;
    this.ready = false;
    if (ws === null) return;
    try {
      ws.close(code, reason);
    } catch {
      // already closing
    }
  }

  private send(event: ClientEvent): boolean {
    const ws = this.ws;
    if (ws === null || ws.readyState !== OPEN) return false;
    ws.send(JSON.stringify(event));
    this.debug.sent[event.type] = (this.debug.sent[event.type] ?? 0) + 1;
    return true;
  }

  private sendVoice(): void {
    if (this.voice === null || (this.voices.length > 0 && !this.voices.includes(this.voice))) return;
    this.send({ type: "session.update", session: { audio: { output: { voice: this.voice } } } });
  }

  // ---- server events ----------------------------------------------------------------------------

  private handle(event: ServerEvent): void {
    const events = this.debug.events;
    events.push(event.type);
    if (events.length > MAX_EVENTS_KEPT) events.splice(0, events.length - MAX_EVENTS_KEPT);
    this.mark(event.type);
    switch (event.type) {
      case "session.created":
        this.ready = true;
        this.hadSession = true;
        this.attempts = 0;
        this.reconnectInfo = null;
        this.lastCloseBusy = false;
        for (const pcm of this.preconnect.splice(0)) this.appendAudio(pcm);
        break;
      case "x-server.info":
        this.voices = event.voices;
        this.defaultVoice = event.default_voice;
        this.randomWeights = event.random_weights;
        this.maxReplySeconds = event.max_reply_seconds;
        if (event.conversation_id) this.conversationId = event.conversation_id;
        if (this.voice !== null && !this.voices.includes(this.voice)) this.voice = null;
        if (this.voice !== null && this.voice !== this.defaultVoice) this.sendVoice();
        break;
      case "input_audio_buffer.speech_started":
        this.userSpeaking = true;
        this.turnEndAt = null;
        this.upsertEntry({ id: event.item_id, role: "user", text: "", status: "pending" });
        if (this.response !== null || this.hasUnfinishedAudio()) void this.interrupt("barge-in", false);
        break;
      case "input_audio_buffer.speech_stopped":
        this.userSpeaking = false;
        this.turnEndAt = this.now();
        this.awaitingReply = true;
        break;
      case "input_audio_buffer.committed":
        this.userSpeaking = false;
        this.turnEndAt ??= this.now();
        this.awaitingReply = true;
        if (!this.transcriptEntry(event.item_id)) this.upsertEntry({ id: event.item_id, role: "user", text: "", status: "pending" });
        break;
      case "conversation.item.input_audio_transcription.delta": {
        // Words heard while the person speaks; `completed` replaces them with the final transcript.
        const entry = this.transcriptEntry(event.item_id);
        if (entry?.status === "done") break;
        this.upsertEntry({ id: event.item_id, role: "user", text: (entry?.text ?? "") + event.delta, status: "pending" });
        break;
      }
      case "conversation.item.input_audio_transcription.completed":
        this.upsertEntry({ id: event.item_id, role: "user", text: event.transcript.trim(), status: "done" });
        break;
      case "conversation.item.truncated":
        this.debug.truncated.push({ itemId: event.item_id, audioEndMs: event.audio_end_ms });
        break;
      case "response.created":
        this.response = { id: event.response.id, itemId: null };
        this.awaitingReply = false;
        break;
      case "response.output_item.added":
        if (this.response?.id === event.response_id) this.response.itemId = event.item.id;
        if (!this.droppedResponses.has(event.response_id)) {
          this.upsertEntry({ id: event.item.id, role: "assistant", text: "", status: "streaming" });
        }
        break;
      case "response.output_audio_transcript.delta":
        if (this.droppedResponses.has(event.response_id)) break;
        this.upsertEntry({ id: event.item_id, role: "assistant", text: (this.transcriptEntry(event.item_id)?.text ?? "") + event.delta, status: "streaming" });
        break;
      case "response.output_audio_transcript.done":
        if (this.droppedResponses.has(event.response_id)) break;
        this.updateEntry(event.item_id, { text: event.transcript });
        break;
      case "response.output_audio.delta":
        this.audioDelta(event.response_id, event.item_id, event.delta);
        return; // the rendered state does not change with each delta
      case "response.output_audio.done": {
        const item = this.items.get(event.item_id);
        if (item && !item.dropped) {
          item.audioDone = true;
          this.player?.end(event.item_id);
        }
        break;
      }
      case "response.done":
        this.responseDone(event.response);
        break;
      case "error":
        this.serverError(event.error);
        break;
      default:
        return;
    }
    this.emit();
  }

  private audioDelta(responseId: string, itemId: string, delta: string): void {
    if (this.droppedResponses.has(responseId)) return;
    let item = this.items.get(itemId);
    if (item === undefined) {
      item = { received: 0, audioDone: false, finished: false, dropped: false };
      this.items.set(itemId, item);
    }
    if (item.dropped) return;
    let pcm: Int16Array;
    try {
      pcm = base64ToPcm16(delta);
    } catch {
      return;
    }
    item.received += pcm.length;
    this.debug.receivedByItem[itemId] = item.received;
    this.player?.push(itemId, pcm);
  }

  private responseDone(response: Extract<ServerEvent, { type: "response.done" }>["response"]): void {
    const interrupted = this.droppedResponses.has(response.id);
    if (this.response?.id === response.id) {
      const itemId = this.response.itemId;
      this.response = null;
      if (itemId !== null) {
        const entry = this.transcriptEntry(itemId);
        if (interrupted || response.status === "cancelled") this.updateEntry(itemId, { status: "interrupted" });
        else if (response.status === "failed") this.updateEntry(itemId, { status: "failed" });
        else if (entry?.status === "streaming" && !this.items.get(itemId)?.received) this.updateEntry(itemId, { status: "done" });
        else if (entry?.status === "streaming" && this.items.get(itemId)?.finished) this.updateEntry(itemId, { status: "done" });
      }
    }
    if (response.status === "failed" && !interrupted) {
      const err = response.status_details?.error;
      this.showNotice(err?.code ?? "response_failed", err?.message ?? "The reply failed.");
    }
    if (this.pendingCreate) {
      this.pendingCreate = false;
      this.awaitingReply = true;
      this.send({ type: "response.create" });
    }
  }

  private serverError(error: { code: string; message: string }): void {
    if (error.code === "unauthorized") {
      this.fail("auth", error.message);
      return;
    }
    if (error.code === "server_busy" && !this.ready) {
      this.lastCloseBusy = true; // the close (1013) follows
      return;
    }
    if (this.response === null) this.awaitingReply = false;
    this.showNotice(error.code, error.message);
  }

  // ---- barge-in ---------------------------------------------------------------------------------

  private hasUnfinishedAudio(): boolean {
    for (const item of this.items.values()) if (item.received > 0 && !item.finished && !item.dropped) return true;
    return false;
  }

  /**
   * Stop the reply now: drop its audio (queued and still to come), ask the server to cancel it if it
   * is still running and `cancel` (with server VAD a barge-in already cancelled it), and truncate each
   * unfinished item to what was played.
   */
  private async interrupt(reason: InterruptReason, cancel: boolean): Promise<void> {
    const response = this.response;
    if (response !== null) {
      this.droppedResponses.add(response.id);
      if (cancel) this.send({ type: "response.cancel", response_id: response.id });
    }
    const candidates = new Set<string>();
    for (const [id, item] of this.items) {
      if (item.received > 0 && !item.finished && !item.dropped) candidates.add(id);
      item.dropped = item.dropped || !item.finished;
    }
    this.playing = false;
    this.emit();
    if (candidates.size === 0) return; // nothing was queued: nothing to flush or truncate
    const played = await this.flushPlayer(candidates);
    this.debug.flushes.push({ reason, played });
    for (const [itemId, samples] of Object.entries(played)) {
      if (!candidates.has(itemId)) continue;
      const audioEndMs = Math.floor((samples * 1000) / WIRE_RATE);
      if (this.send({ type: "conversation.item.truncate", item_id: itemId, content_index: 0, audio_end_ms: audioEndMs })) {
        this.debug.truncates.push({ itemId, audioEndMs, reason });
      }
      this.updateEntry(itemId, { status: "interrupted" });
    }
    this.emit();
  }

  private async flushPlayer(candidates: Set<string>): Promise<Record<string, number>> {
    // Without a report in time, the last progress counts stand in (they lag by at most ~50 ms).
    const fallback = (): Record<string, number> => {
      const out: Record<string, number> = {};
      for (const id of candidates) out[id] = this.debug.playedByItem[id] ?? 0;
      return out;
    };
    if (this.player === null) return fallback();
    let timer: unknown = null;
    const timeout = new Promise<Record<string, number>>((resolve) => {
      timer = this.timers.setTimeout(() => resolve(fallback()), this.flushTimeoutMs);
    });
    try {
      const played = await Promise.race([this.player.flush(), timeout]);
      for (const id of candidates) if (!(id in played)) played[id] = this.debug.playedByItem[id] ?? this.items.get(id)?.received ?? 0;
      for (const [id, n] of Object.entries(played)) this.debug.playedByItem[id] = n;
      return played;
    } finally {
      this.timers.clearTimeout(timer);
    }
  }

  /** The connection is gone: what was queued cannot be truncated any more; silence it. */
  private dropAllAudio(): void {
    let any = false;
    for (const item of this.items.values()) {
      if (!item.finished && !item.dropped && item.received > 0) any = true;
      item.dropped = item.dropped || !item.finished;
    }
    if (this.response !== null) this.droppedResponses.add(this.response.id);
    if (any && this.player !== null) void this.player.flush();
    this.playing = false;
  }

  private resetTurnState(): void {
    this.response = null;
    this.awaitingReply = false;
    this.pendingCreate = false;
    this.userSpeaking = false;
    this.turnEndAt = null;
    if (!this.running) this.playing = false;
  }

  // ---- rendered state ---------------------------------------------------------------------------

  private transcriptEntry(id: string): TranscriptEntry | undefined {
    return this.transcript.find((e) => e.id === id);
  }

  private upsertEntry(entry: TranscriptEntry): void {
    const i = this.transcript.findIndex((e) => e.id === entry.id);
    if (i < 0) this.transcript = [...this.transcript, entry];
    else if (this.transcript[i].status !== "interrupted" || entry.role === "user") {
      this.transcript = this.transcript.map((e, k) => (k === i ? { ...e, ...entry, typed: e.typed } : e));
    }
  }

  private updateEntry(id: string, patch: Partial<TranscriptEntry>): void {
    if (!this.transcriptEntry(id)) return;
    this.transcript = this.transcript.map((e) => (e.id === id ? { ...e, ...patch } : e));
  }

  private showNotice(code: string, message: string): void {
    this.notice = { id: ++this.noticeSeq, code, message };
  }

  private computePhase(): Phase {
    if (this.failure !== null) return "error";
    if (!this.running) return "idle";
    if (this.reconnectInfo !== null) return "reconnecting";
    if (!this.ready) return "connecting";
    if (this.playing) return "speaking";
    if (this.userSpeaking) return "listening";
    // A reply being made, or received and waiting for its pre-roll, is still "thinking" to the person.
    const replying = this.response !== null && !this.droppedResponses.has(this.response.id);
    if (replying || this.awaitingReply || this.hasUnfinishedAudio()) return "thinking";
    return "listening";
  }

  private buildSnapshot(): ClientSnapshot {
    const latencies = this.latencies;
    return {
      phase: this.computePhase(),
      failure: this.failure,
      userSpeaking: this.userSpeaking,
      transcript: this.transcript,
      voices: this.voices,
      voice: this.voice,
      defaultVoice: this.defaultVoice,
      randomWeights: this.randomWeights,
      maxReplySeconds: this.maxReplySeconds,
      latencyMs: latencies.length ? latencies[latencies.length - 1] : null,
      latencies,
      reconnect: this.reconnectInfo,
      notice: this.notice,
      conversationId: this.conversationId,
    };
  }

  private emit(): void {
    const next = this.buildSnapshot();
    const prev = this.snapshot;
    const changed = (Object.keys(next) as (keyof ClientSnapshot)[]).some((k) => next[k] !== prev[k]);
    if (!changed) return;
    this.snapshot = next;
    for (const listener of this.listeners) listener();
  }
}
