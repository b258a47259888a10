/**
 * The page's side of the realtime protocol, free of Web Audio and React: one conversation over a
 * WebSocket, as three parts and the wiring between them.
 *
 * - `Connection` (connection.ts): the socket, the reconnect policy and which closes end the call.
 * - `TurnTracker` (turnTracker.ts): the reply being made and played, barge-in and truncation, latency.
 * - `reduceView` (viewState.ts): what the person sees, as a pure reducer over the server's events and
 *   the page's; `phaseOf` adds the connection's status and the turn's activity.
 *
 * States the person sees (`Phase`): connecting → listening ⇄ thinking → speaking → listening; plus
 * reconnecting and error. React reads them with `subscribe`/`getSnapshot` (useSyncExternalStore).
 */

import {
  Connection,
  type ConnectionCounters,
  type ReconnectInfo,
  type ReconnectPolicy,
  type Refusal,
  type SocketLike,
  type Timers,
} from "./connection";
import type { ClientEvent, ServerEvent } from "./protocol";
import { type Player, type TurnCounters, TurnTracker } from "./turnTracker";
import {
  type FailureKind,
  initialView,
  type Phase,
  phaseOf,
  reduceView,
  type ViewEvent,
  type ViewState,
} from "./viewState";

/** What the page renders: the view state (less its notice counter), the connection's and the turn's. */
export interface ClientSnapshot extends Omit<ViewState, "noticeSeq"> {
  phase: Phase;
  latencyMs: number | null;
  reconnect: ReconnectInfo | null;
  conversationId: string | null;
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
  diagnoseRefusal?: () => Promise<Refusal>;
  /** How long to wait for the player's flush report before using the last progress. */
  flushTimeoutMs?: number;
}

/** Counters for tests and debugging (`window.__csm`); not part of the rendered state. */
export interface ClientDebug extends TurnCounters, ConnectionCounters {
  events: string[];
  /** Server event types and player reports with the time they came (ms, the client's clock). */
  timeline: [number, string][];
}

const MAX_EVENTS_KEPT = 1000;

function randomHex(bytes: number): string {
  const a = new Uint8Array(bytes);
  if (globalThis.crypto?.getRandomValues) globalThis.crypto.getRandomValues(a);
  else for (let i = 0; i < bytes; i++) a[i] = Math.floor(Math.random() * 256);
  return [...a].map((b) => b.toString(16).padStart(2, "0")).join("");
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

  private readonly connection: Connection;
  private readonly turns: TurnTracker;
  private view: ViewState;
  private snapshot: ClientSnapshot;
  private readonly listeners = new Set<() => void>();
  private readonly now: () => number;
  private readonly newId: (prefix: string) => string;

  constructor(options: ClientOptions) {
    const timers = options.timers ?? {
      setTimeout: (fn, ms) => globalThis.setTimeout(fn, ms),
      clearTimeout: (h) => globalThis.clearTimeout(h as ReturnType<typeof setTimeout>),
    };
    this.now = options.now ?? (() => performance.now());
    this.newId = options.newId ?? ((prefix) => `${prefix}_${randomHex(10)}`);
    this.connection = new Connection({
      endpoint: options.endpoint,
      token: options.token ?? "",
      createSocket: options.createSocket ?? ((url) => new WebSocket(url) as SocketLike),
      timers,
      random: options.random ?? Math.random,
      policy: { maxAttempts: 5, baseDelayMs: 500, maxDelayMs: 8000, ...options.reconnect },
      diagnoseRefusal: options.diagnoseRefusal,
      counters: this.debug,
      events: {
        message: (event) => this.handle(event),
        lost: () => {
          this.turns.dropAll();
          this.turns.reset();
          this.view = reduceView(this.view, { type: "turn.reset" });
        },
        ended: (notice) => this.show([{ type: "notice", code: "closed", message: notice }]),
        failed: (kind, message) => this.fail(kind, message),
        changed: () => this.emit(),
      },
    });
    this.turns = new TurnTracker({
      send: (event) => this.connection.send(event),
      show: (events) => this.show(events),
      timers,
      now: this.now,
      flushTimeoutMs: options.flushTimeoutMs ?? 500,
      counters: this.debug,
    });
    this.view = initialView(options.voice ?? null);
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
    this.turns.setPlayer(player);
  }

  /** Change where the next connection goes (settings panel); a running call keeps its socket. */
  configure(endpoint: string, token: string): void {
    this.connection.configure(endpoint, token);
  }

  /** Start a new conversation. */
  start(): void {
    this.begin(false);
  }

  /** After a failure: try again, resuming the same conversation. */
  retry(): void {
    this.begin(true);
  }

  /** The microphone (or audio) could not be used: show it, and end the call. */
  fail(kind: FailureKind, message: string): void {
    if (this.view.failure !== null && !this.connection.inCall) return; // the first failure is the one to show
    this.connection.close("client failed");
    this.turns.reset();
    this.show([{ type: "call.failed", failure: { kind, message } }]);
  }

  /** End the call: what was playing is flushed and truncated, then the socket closes normally. */
  async stop(): Promise<void> {
    if (!this.connection.inCall) {
      if (this.view.failure !== null) this.show([{ type: "failure.dismissed" }]);
      return;
    }
    this.connection.hangUp();
    if (this.connection.ready && this.turns.replyInProgress) await this.turns.interrupt("stop", true);
    this.connection.close("call ended");
    this.turns.reset();
    this.show([{ type: "turn.reset" }]);
  }

  /** Clear the failure screen without connecting. */
  dismissFailure(): void {
    this.show([{ type: "failure.dismissed" }]);
  }

  /** One chunk of the microphone at 24 kHz (from the capture worklet). */
  appendAudio(pcm: Int16Array): void {
    this.connection.sendAudio(pcm);
  }

  /** A typed turn: interrupts a reply in progress, then asks for a spoken answer. */
  async sendText(text: string): Promise<boolean> {
    const clean = text.trim();
    if (!clean || !this.connection.ready) return false;
    if (this.turns.replyInProgress) await this.turns.interrupt("typed", true);
    if (!this.connection.ready) return false;
    this.send({
      type: "conversation.item.create",
      // No item id: the server makes them (ours stays the transcript entry's, on this page only).
      item: { type: "message", role: "user", content: [{ type: "input_text", text: clean }] },
    });
    this.turns.typed();
    this.show([{ type: "user.typed", id: this.newId("item"), text: clean }]);
    return true;
  }

  setVoice(voice: string | null): void {
    this.show([{ type: "voice.chosen", voice }]);
    if (this.connection.ready) this.sendVoice();
  }

  dismissNotice(id: number): void {
    this.show([{ type: "notice.dismissed", id }]);
  }

  // ---- what the player reports ------------------------------------------------------------------

  /** The player rendered the item's first frame; it reaches the ears `outputLatencyMs` later. */
  playbackStarted(itemId: string, outputLatencyMs = 0): void {
    this.mark(`player.started ${itemId}`);
    this.turns.playbackStarted(itemId, outputLatencyMs);
  }

  playbackFinished(itemId: string): void {
    this.turns.playbackFinished(itemId);
  }

  playbackDrained(): void {
    this.mark("player.drained");
    this.turns.playbackDrained();
  }

  playbackProgress(items: { itemId: string; played: number }[]): void {
    this.turns.playbackProgress(items);
  }

  // ---- wiring -----------------------------------------------------------------------------------

  private begin(resume: boolean): void {
    this.turns.clear();
    this.view = reduceView(this.view, { type: "call.started", resume });
    this.connection.start(resume);
    this.emit();
  }

  private handle(event: ServerEvent): void {
    const events = this.debug.events;
    events.push(event.type);
    if (events.length > MAX_EVENTS_KEPT) events.splice(0, events.length - MAX_EVENTS_KEPT);
    this.mark(event.type);
    if (!this.connection.serverEvent(event)) return;
    this.turns.serverEvent(event);
    const { voice, defaultVoice } = this.view;
    if (event.type === "x-server.info" && voice !== null && voice !== defaultVoice) this.sendVoice();
  }

  private send(event: ClientEvent): boolean {
    return this.connection.send(event);
  }

  private sendVoice(): void {
    const { voice, voices } = this.view;
    if (voice === null || (voices.length > 0 && !voices.includes(voice))) return;
    this.send({ type: "session.update", session: { audio: { output: { voice } } } });
  }

  private mark(what: string): void {
    const timeline = this.debug.timeline;
    if (timeline.length >= MAX_EVENTS_KEPT) timeline.splice(0, timeline.length - MAX_EVENTS_KEPT + 1);
    if (what !== "response.output_audio.delta" || timeline.at(-1)?.[1] !== what) timeline.push([Math.round(this.now()), what]);
  }

  private show(events: readonly ViewEvent[]): void {
    for (const event of events) this.view = reduceView(this.view, event);
    this.emit();
  }

  private buildSnapshot(): ClientSnapshot {
    const { noticeSeq: _, ...view } = this.view;
    return {
      ...view,
      phase: phaseOf(this.view, this.connection.status, this.turns.activity),
      latencyMs: view.latencies.at(-1) ?? null,
      reconnect: this.connection.reconnect,
      conversationId: this.connection.conversation,
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
