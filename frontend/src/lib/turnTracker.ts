/**
 * The rules of turn-taking on the page's side: which reply is being made, which of its items the player
 * is playing, and what happens when the person cuts in.
 *
 * - Barge-in: when the server hears the person during a reply (`input_audio_buffer.speech_started`), or
 *   the person types or ends the call, the player is flushed and, for each reply item that had not been
 *   played to its end, `conversation.item.truncate` tells the server how much was actually heard
 *   (`audio_end_ms`), so its history matches what the person heard. Audio and words still in flight for
 *   an interrupted reply are dropped.
 * - A turn typed during a reply asks for the new reply only once the cancelled one is done.
 * - Latency: from the end of the person's turn (`speech_stopped`, the commit, or a typed send) to the
 *   first reply audio the player actually played (plus the output's own latency).
 *
 * It sees every server event and every player report, and tells the view what the person should see of
 * them (`show`); what belongs to an interrupted reply is left out.
 */

import { base64ToPcm16 } from "./pcm";
import { type ClientEvent, type ServerEvent, WIRE_RATE } from "./protocol";
import type { Timers } from "./connection";
import type { TurnActivity, ViewEvent } from "./viewState";

/** What the client needs from the audio output (the playback worklet, or a fake in tests). */
export interface Player {
  push(itemId: string, pcm: Int16Array): void;
  end(itemId: string): void;
  /** Stop and drop what is queued; resolves to wire samples played per unfinished item. */
  flush(): Promise<Record<string, number>>;
}

export type InterruptReason = "barge-in" | "typed" | "stop";

export interface TruncateRecord {
  itemId: string;
  audioEndMs: number;
  reason: InterruptReason;
}

/** Counters for tests and debugging; `playedByItem` is also the fallback when a flush goes unanswered. */
export interface TurnCounters {
  receivedByItem: Record<string, number>;
  playedByItem: Record<string, number>;
  truncates: TruncateRecord[];
  flushes: { reason: InterruptReason; played: Record<string, number> }[];
  truncated: { itemId: string; audioEndMs: number }[];
}

export interface TurnTrackerOptions {
  send: (event: ClientEvent) => boolean;
  /** The view's events, in order; an empty list when only the activity changed. */
  show: (events: readonly ViewEvent[]) => void;
  timers: Timers;
  now: () => number;
  /** How long to wait for the player's flush report before using the last progress. */
  flushTimeoutMs: number;
  counters: TurnCounters;
}

interface ItemAudio {
  received: number;
  finished: boolean; // played to its end
  dropped: boolean; // interrupted: its audio is no longer played
}

export class TurnTracker {
  private readonly options: TurnTrackerOptions;
  private readonly counters: TurnCounters;
  private player: Player | null = null;
  private response: { id: string; itemId: string | null } | null = null;
  private readonly droppedResponses = new Set<string>();
  private readonly items = new Map<string, ItemAudio>();
  private awaitingReply = false;
  private pendingCreate = false; // response.create to send when the cancelled reply is done
  private playing = false;
  private turnEndAt: number | null = null;

  constructor(options: TurnTrackerOptions) {
    this.options = options;
    this.counters = options.counters;
  }

  setPlayer(player: Player | null): void {
    this.player = player;
  }

  get activity(): TurnActivity {
    if (this.playing) return "speaking";
    const replying = this.response !== null && !this.droppedResponses.has(this.response.id);
    return replying || this.awaitingReply || this.hasUnfinishedAudio() ? "thinking" : "quiet";
  }

  /** A reply is being made, or some of its audio is still to be played: there is something to cut. */
  get replyInProgress(): boolean {
    return this.response !== null || this.hasUnfinishedAudio();
  }

  /** A new call: nothing of the last one is left to play or to truncate. */
  clear(): void {
    this.items.clear();
    this.droppedResponses.clear();
    this.reset();
  }

  /** The turn in progress is over (the call ended or failed, or its socket closed). */
  reset(): void {
    this.response = null;
    this.awaitingReply = false;
    this.pendingCreate = false;
    this.turnEndAt = null;
    this.playing = false;
  }

  /** The connection is gone: what was queued cannot be truncated any more; silence it. */
  dropAll(): void {
    let any = false;
    for (const item of this.items.values()) {
      if (!item.finished && !item.dropped && item.received > 0) any = true;
      item.dropped = item.dropped || !item.finished;
    }
    if (this.response !== null) this.droppedResponses.add(this.response.id);
    if (any && this.player !== null) void this.player.flush();
    this.playing = false;
  }

  /** The person typed a turn (already sent): ask for its reply, after the cancelled one if need be. */
  typed(): void {
    this.turnEndAt = this.options.now();
    this.awaitingReply = true;
    if (this.response !== null) this.pendingCreate = true;
    else this.options.send({ type: "response.create" });
  }

  serverEvent(event: ServerEvent): void {
    const show = this.options.show;
    switch (event.type) {
      case "input_audio_buffer.speech_started":
        this.turnEndAt = null;
        show([event]);
        if (this.replyInProgress) void this.interrupt("barge-in", false); // the server's VAD already cancelled it
        return;
      case "input_audio_buffer.speech_stopped":
        this.turnEndAt = this.options.now();
        this.awaitingReply = true;
        break;
      case "input_audio_buffer.committed":
        this.turnEndAt ??= this.options.now();
        this.awaitingReply = true;
        break;
      case "conversation.item.truncated":
        this.counters.truncated.push({ itemId: event.item_id, audioEndMs: event.audio_end_ms });
        break;
      case "response.created":
        this.response = { id: event.response.id, itemId: null };
        this.awaitingReply = false;
        break;
      case "response.output_item.added":
        if (this.response?.id === event.response_id) this.response.itemId = event.item.id;
        show(this.droppedResponses.has(event.response_id) ? [] : [event]);
        return;
      case "response.output_audio_transcript.delta":
      case "response.output_audio_transcript.done":
        show(this.droppedResponses.has(event.response_id) ? [] : [event]);
        return;
      case "response.output_audio.delta":
        this.audioDelta(event.response_id, event.item_id, event.delta);
        return; // nothing the person sees changes with each delta
      case "response.output_audio.done": {
        const item = this.items.get(event.item_id);
        if (item && !item.dropped) this.player?.end(event.item_id);
        break;
      }
      case "response.done":
        show(this.responseDone(event.response));
        return;
      case "error":
        if (this.response === null) this.awaitingReply = false;
        break;
    }
    show([event]);
  }

  // ---- what the player reports ------------------------------------------------------------------

  /** The player rendered the item's first frame; it reaches the ears `outputLatencyMs` later. */
  playbackStarted(itemId: string, outputLatencyMs: number): void {
    if (this.items.get(itemId)?.dropped) return;
    this.playing = true;
    const turnEndAt = this.turnEndAt;
    this.turnEndAt = null;
    const latencyMs = turnEndAt === null ? null : Math.round(this.options.now() + outputLatencyMs - turnEndAt);
    this.options.show(latencyMs === null ? [] : [{ type: "reply.heard", latencyMs }]);
  }

  playbackFinished(itemId: string): void {
    const item = this.items.get(itemId);
    if (item) item.finished = true;
    // The line of a reply still being made ends with its response.done.
    this.options.show(this.response?.itemId === itemId ? [] : [{ type: "reply.status", itemId, status: "done" }]);
  }

  playbackDrained(): void {
    if (!this.playing) return;
    this.playing = false;
    this.options.show([]);
  }

  playbackProgress(items: { itemId: string; played: number }[]): void {
    for (const { itemId, played } of items) this.counters.playedByItem[itemId] = played;
  }

  // ---- barge-in ---------------------------------------------------------------------------------

  /**
   * Stop the reply now: drop its audio (queued and still to come), ask the server to cancel it if it
   * is still running and `cancel` (with server VAD a barge-in already cancelled it), and truncate each
   * unfinished item to what was played.
   */
  async interrupt(reason: InterruptReason, cancel: boolean): Promise<void> {
    const response = this.response;
    if (response !== null) {
      this.droppedResponses.add(response.id);
      if (cancel) this.options.send({ type: "response.cancel", response_id: response.id });
    }
    const candidates = new Set<string>();
    for (const [id, item] of this.items) {
      if (item.received > 0 && !item.finished && !item.dropped) candidates.add(id);
      item.dropped = item.dropped || !item.finished;
    }
    this.playing = false;
    this.options.show([]);
    if (candidates.size === 0) return; // nothing was queued: nothing to flush or truncate
    const played = await this.flushPlayer(candidates);
    this.counters.flushes.push({ reason, played });
    const shown: ViewEvent[] = [];
    for (const [itemId, samples] of Object.entries(played)) {
      if (!candidates.has(itemId)) continue;
      const audioEndMs = Math.floor((samples * 1000) / WIRE_RATE);
      if (this.options.send({ type: "conversation.item.truncate", item_id: itemId, content_index: 0, audio_end_ms: audioEndMs })) {
        this.counters.truncates.push({ itemId, audioEndMs, reason });
      }
      shown.push({ type: "reply.status", itemId, status: "interrupted" });
    }
    this.options.show(shown);
  }

  private hasUnfinishedAudio(): boolean {
    for (const item of this.items.values()) if (item.received > 0 && !item.finished && !item.dropped) return true;
    return false;
  }

  private async flushPlayer(candidates: Set<string>): Promise<Record<string, number>> {
    const playedByItem = this.counters.playedByItem;
    // Without a report in time, the last progress counts stand in (they lag by at most ~50 ms).
    const fallback = (): Record<string, number> => {
      const out: Record<string, number> = {};
      for (const id of candidates) out[id] = playedByItem[id] ?? 0;
      return out;
    };
    if (this.player === null) return fallback();
    const timers = this.options.timers;
    let timer: unknown = null;
    const timeout = new Promise<Record<string, number>>((resolve) => {
      timer = timers.setTimeout(() => resolve(fallback()), this.options.flushTimeoutMs);
    });
    try {
      const played = await Promise.race([this.player.flush(), timeout]);
      for (const id of candidates) if (!(id in played)) played[id] = playedByItem[id] ?? this.items.get(id)?.received ?? 0;
      for (const [id, n] of Object.entries(played)) playedByItem[id] = n;
      return played;
    } finally {
      timers.clearTimeout(timer);
    }
  }

  private audioDelta(responseId: string, itemId: string, delta: string): void {
    if (this.droppedResponses.has(responseId)) return;
    let item = this.items.get(itemId);
    if (item === undefined) {
      item = { received: 0, finished: false, dropped: false };
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
    this.counters.receivedByItem[itemId] = item.received;
    this.player?.push(itemId, pcm);
  }

  private responseDone(response: Extract<ServerEvent, { type: "response.done" }>["response"]): ViewEvent[] {
    const shown: ViewEvent[] = [];
    const interrupted = this.droppedResponses.has(response.id);
    if (this.response?.id === response.id) {
      const itemId = this.response.itemId;
      this.response = null;
      if (itemId !== null) {
        const item = this.items.get(itemId);
        if (interrupted || response.status === "cancelled") shown.push({ type: "reply.status", itemId, status: "interrupted" });
        else if (response.status === "failed") shown.push({ type: "reply.status", itemId, status: "failed" });
        // Done now if it had no audio, or was played to its end already; else when the player finishes it.
        else if (!item?.received || item.finished) shown.push({ type: "reply.status", itemId, status: "done" });
      }
    }
    if (response.status === "failed" && !interrupted) {
      const err = response.status_details?.error;
      shown.push({ type: "notice", code: err?.code ?? "response_failed", message: err?.message ?? "The reply failed." });
    }
    if (this.pendingCreate) {
      this.pendingCreate = false;
      this.awaitingReply = true;
      this.options.send({ type: "response.create" });
    }
    return shown;
  }
}
