/**
 * The playback jitter buffer: the state machine inside the playback worklet, kept free of Web Audio so
 * it can be tested directly.
 *
 * Audio arrives in chunks tagged with the reply item they belong to (already at the output rate), and
 * is rendered in blocks (the audio thread's 128 frames). States:
 *
 *   idle ──push──► buffering ──pre-roll reached, or the item is complete──► playing
 *   playing ──ran dry, more audio expected──► buffering (an underrun: the pre-roll grows ×`growth`,
 *                                             up to `maxPrerollMs`)
 *   playing ──ran dry, every item complete──► idle ("drained"; the pre-roll relaxes toward its base)
 *   any ──flush──► idle (the next `fadeMs` of audio still play, fading out; the rest is dropped)
 *
 * No clicks: playback fades in over `fadeMs` whenever it (re)starts; when it runs dry the last sample
 * value ramps to zero over `fadeMs` instead of jumping; a flush fades out what it cuts.
 *
 * Accounting: each chunk carries how many source samples (24 kHz wire samples) it came from; as its
 * frames are rendered, that many source samples are credited to its item, proportionally and exactly
 * once the chunk is fully played. So `played` is in the unit of the wire, and a reply that played to
 * its end has played == received, whatever the output rate.
 */

export type PlaybackState = "idle" | "buffering" | "playing";

export interface JitterBufferOptions {
  /** Frames per second of the audio pushed and rendered (the AudioContext's rate). */
  sampleRate: number;
  /**
   * Audio buffered before playback starts (default 120 ms). Below the server's first item of a reply (3
   * frames, 240 ms: `FIRST_FRAMES` in csm/async_engine.py), so a reply starts with its first delta and the
   * next one has 240 ms to arrive, which holds while generation keeps up with real time. A 1-frame first
   * item (as before) made the page wait for the second anyway, and a shorter pre-roll ran dry after it.
   */
  prerollMs?: number;
  maxPrerollMs?: number;
  /** Pre-roll multiplier after an underrun. */
  growth?: number;
  /** Pre-roll multiplier (toward `prerollMs`) after a reply that played without an underrun. */
  recovery?: number;
  fadeMs?: number;
}

export interface RenderEvents {
  /** Items whose first frame was rendered in this block. */
  started: string[];
  /** Items that were complete and have now been played to their end. */
  finished: string[];
  underrun: boolean;
  drained: boolean;
}

export interface ItemProgress {
  itemId: string;
  /** Source (wire) samples received and played. */
  received: number;
  played: number;
  ended: boolean;
  finished: boolean;
  flushed: boolean;
}

export interface JitterStats {
  state: PlaybackState;
  bufferedFrames: number;
  bufferedMs: number;
  prerollMs: number;
  underruns: number;
  /** Source samples played, all items together. */
  totalPlayed: number;
  /** Frames of item audio rendered (fades included), all items together. */
  totalFrames: number;
}

interface Item {
  id: string;
  received: number;
  played: number;
  queued: number; // chunks of this item still in the queue
  carry: number; // source samples of zero-length chunks, credited with the next chunk
  started: boolean;
  ended: boolean;
  finished: boolean;
  flushed: boolean;
  underran: boolean;
}

interface Chunk {
  item: Item;
  data: Float32Array;
  offset: number;
  source: number;
  credited: number;
}

const MAX_ITEMS = 16;

export class JitterBuffer {
  readonly sampleRate: number;
  readonly basePrerollMs: number;
  readonly maxPrerollMs: number;
  readonly fadeFrames: number;
  private readonly growth: number;
  private readonly recovery: number;
  private prerollFrames: number;
  private state: PlaybackState = "idle";
  private readonly queue: Chunk[] = [];
  private head = 0; // index of the first live chunk in `queue` (shifted lazily)
  private buffered = 0;
  private readonly items = new Map<string, Item>();
  private open: Item | null = null; // the item still receiving audio
  private fadeIn = 0; // frames of fade-in left
  private last = 0; // the last sample rendered from the queue
  private releaseFrom = 0; // value being ramped to zero after running dry
  private release = 0; // frames of that ramp left
  private tail: Float32Array | null = null; // a flush's fade-out, still to render
  private tailPos = 0;
  private underruns = 0;
  private totalPlayed = 0;
  private totalFrames = 0;
  private readonly pending: RenderEvents = { started: [], finished: [], underrun: false, drained: false };
  private readonly events: RenderEvents = { started: [], finished: [], underrun: false, drained: false };

  constructor(options: JitterBufferOptions) {
    this.sampleRate = options.sampleRate;
    this.basePrerollMs = options.prerollMs ?? 120;
    this.maxPrerollMs = Math.max(options.maxPrerollMs ?? 600, this.basePrerollMs);
    this.growth = options.growth ?? 1.5;
    this.recovery = options.recovery ?? 0.8;
    this.fadeFrames = Math.max(1, Math.round(((options.fadeMs ?? 5) * this.sampleRate) / 1000));
    this.prerollFrames = this.msToFrames(this.basePrerollMs);
  }

  get playbackState(): PlaybackState {
    return this.state;
  }

  stats(): JitterStats {
    return {
      state: this.state,
      bufferedFrames: this.buffered,
      bufferedMs: (this.buffered * 1000) / this.sampleRate,
      prerollMs: (this.prerollFrames * 1000) / this.sampleRate,
      underruns: this.underruns,
      totalPlayed: this.totalPlayed,
      totalFrames: this.totalFrames,
    };
  }

  /** Progress of the items still tracked (the last few, finished ones included). */
  progress(): ItemProgress[] {
    return [...this.items.values()].map((it) => ({
      itemId: it.id,
      received: it.received,
      played: it.played,
      ended: it.ended,
      finished: it.finished,
      flushed: it.flushed,
    }));
  }

  played(itemId: string): number {
    return this.items.get(itemId)?.played ?? 0;
  }

  /**
   * Queue `data` (frames at `sampleRate`) for `itemId`; `source` is how many wire samples it came from.
   * Audio for an item that was flushed or has ended is ignored (returns false).
   */
  push(itemId: string, data: Float32Array, source: number = data.length): boolean {
    let item = this.items.get(itemId);
    if (item === undefined) {
      item = { id: itemId, received: 0, played: 0, queued: 0, carry: 0, started: false, ended: false, finished: false, flushed: false, underran: false };
      this.items.set(itemId, item);
      this.prune();
    }
    if (item.flushed || item.ended) return false;
    if (this.open !== null && this.open !== item) this.end(this.open.id); // a new reply closes the last
    this.open = item;
    item.received += source;
    if (data.length === 0) {
      const lastChunk = this.queue.length > this.head ? this.queue[this.queue.length - 1] : null;
      if (lastChunk !== null && lastChunk.item === item) lastChunk.source += source;
      else item.carry += source;
      return true;
    }
    this.queue.push({ item, data, offset: 0, source: source + item.carry, credited: 0 });
    item.carry = 0;
    item.queued++;
    this.buffered += data.length;
    if (this.state === "idle") this.state = "buffering";
    return true;
  }

  /** No more audio will come for `itemId`: it may start below the pre-roll, and finish when played. */
  end(itemId: string): void {
    const item = this.items.get(itemId);
    if (item === undefined || item.ended || item.flushed) return;
    item.ended = true;
    if (this.open === item) this.open = null;
    if (item.queued === 0) {
      this.credit(item, item.carry);
      item.carry = 0;
      if (item.started || item.received > 0) this.finish(item, this.pending);
      if (this.state === "buffering" && this.buffered === 0 && this.open === null) {
        this.state = "idle";
        this.pending.drained = true;
      }
    }
  }

  /**
   * Stop now: what is queued is dropped after a `fadeMs` fade-out. Returns, for every item that had not
   * finished, the source samples played (the fade-out included): what the person actually heard.
   */
  flush(): Record<string, number> {
    if (this.state === "playing") {
      const tail = new Float32Array(this.fadeFrames);
      const got = this.read(tail, 0, tail.length, this.pending);
      for (let k = 0; k < got; k++) tail[k] *= (tail.length - k) / (tail.length + 1);
      const from = got > 0 ? tail[got - 1] : this.last;
      for (let k = got; k < tail.length; k++) tail[k] = from * ((tail.length - k) / (tail.length - got + 1));
      this.tail = tail;
      this.tailPos = 0;
    }
    const played: Record<string, number> = {};
    for (const item of this.items.values()) {
      if (item.finished || item.flushed) continue;
      item.flushed = true;
      if (item.received > 0) played[item.id] = item.played;
    }
    for (let k = this.head; k < this.queue.length; k++) this.queue[k].item.queued = 0;
    this.queue.length = 0;
    this.head = 0;
    this.buffered = 0;
    this.open = null;
    this.fadeIn = 0;
    this.last = 0;
    this.state = "idle";
    return played;
  }

  /** Fill `out` with the next block. The returned events object is reused by the next call. */
  render(out: Float32Array): RenderEvents {
    const ev = this.events;
    ev.started.length = 0;
    ev.finished.length = 0;
    ev.underrun = this.pending.underrun;
    ev.drained = this.pending.drained;
    ev.started.push(...this.pending.started);
    ev.finished.push(...this.pending.finished);
    this.pending.started.length = 0;
    this.pending.finished.length = 0;
    this.pending.underrun = false;
    this.pending.drained = false;

    const n = out.length;
    let i = 0;
    if (this.tail !== null) {
      const take = Math.min(n, this.tail.length - this.tailPos);
      out.set(this.tail.subarray(this.tailPos, this.tailPos + take), 0);
      this.tailPos += take;
      this.totalFrames += take;
      i += take;
      if (this.tailPos >= this.tail.length) this.tail = null;
    }
    i = this.ramp(out, i);
    if (this.state === "buffering" && this.release === 0 && this.tail === null && this.canStart()) {
      this.state = "playing";
      this.fadeIn = this.fadeFrames;
    }
    if (this.state === "playing" && i < n) {
      i = this.read(out, i, n, ev);
      if (i < n) {
        this.runDry(ev);
        i = this.ramp(out, i);
      }
    }
    out.fill(0, i);
    return ev;
  }

  private canStart(): boolean {
    return this.buffered > 0 && (this.buffered >= this.prerollFrames || this.open === null);
  }

  /** Frames from the queue into out[i, n), fading in where due; returns where it stopped. */
  private read(out: Float32Array, i: number, n: number, ev: RenderEvents): number {
    while (i < n && this.head < this.queue.length) {
      const chunk = this.queue[this.head];
      const item = chunk.item;
      if (!item.started) {
        item.started = true;
        ev.started.push(item.id);
      }
      const take = Math.min(n - i, chunk.data.length - chunk.offset);
      const data = chunk.data;
      for (let k = 0; k < take; k++) {
        let s = data[chunk.offset + k];
        if (this.fadeIn > 0) {
          s *= (this.fadeFrames - this.fadeIn + 1) / (this.fadeFrames + 1);
          this.fadeIn--;
        }
        out[i + k] = s;
      }
      if (take > 0) this.last = out[i + take - 1];
      chunk.offset += take;
      i += take;
      this.buffered -= take;
      this.totalFrames += take;
      const credited = chunk.offset >= data.length ? chunk.source : Math.floor((chunk.source * chunk.offset) / data.length);
      this.credit(item, credited - chunk.credited);
      chunk.credited = credited;
      if (chunk.offset >= data.length) {
        this.head++;
        item.queued--;
        if (item.queued === 0 && item.ended) this.finish(item, ev);
      }
    }
    if (this.head === this.queue.length) {
      this.queue.length = 0;
      this.head = 0;
    } else if (this.head > 64) {
      this.queue.splice(0, this.head);
      this.head = 0;
    }
    return i;
  }

  private runDry(ev: RenderEvents): void {
    this.releaseFrom = this.last;
    this.release = this.fadeFrames;
    this.last = 0;
    if (this.open !== null) {
      this.state = "buffering";
      this.underruns++;
      this.open.underran = true;
      this.prerollFrames = Math.min(this.msToFrames(this.maxPrerollMs), Math.round(this.prerollFrames * this.growth));
      ev.underrun = true;
    } else {
      this.state = "idle";
      ev.drained = true;
    }
  }

  private ramp(out: Float32Array, i: number): number {
    while (i < out.length && this.release > 0) {
      out[i++] = this.releaseFrom * (this.release / (this.fadeFrames + 1));
      this.release--;
    }
    return i;
  }

  private credit(item: Item, samples: number): void {
    item.played += samples;
    this.totalPlayed += samples;
  }

  private finish(item: Item, ev: RenderEvents): void {
    if (item.finished) return;
    item.finished = true;
    ev.finished.push(item.id);
    if (!item.underran) {
      const base = this.msToFrames(this.basePrerollMs);
      this.prerollFrames = Math.max(base, Math.round(this.prerollFrames * this.recovery));
    }
  }

  private prune(): void {
    for (const [id, item] of this.items) {
      if (this.items.size <= MAX_ITEMS) break;
      if (item.finished || item.flushed) this.items.delete(id);
    }
  }

  private msToFrames(ms: number): number {
    return Math.round((ms * this.sampleRate) / 1000);
  }
}
