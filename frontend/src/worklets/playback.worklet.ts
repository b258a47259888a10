/**
 * Reply playback on the audio thread: 24 kHz PCM16 deltas are resampled to the context's rate as they
 * arrive (one continuous stream per reply item, its filter tail flushed at the item's end) and queued in
 * the jitter buffer, which renders 128-frame blocks. The page hears back when an item starts and
 * finishes, about underruns, and every `progressMs` how much of each item was played, in wire samples.
 */

import { JitterBuffer } from "../lib/jitterBuffer";
import { pcm16ToFloat } from "../lib/pcm";
import { Resampler } from "../lib/resampler";
import { PLAYBACK_PROCESSOR, type PlaybackCommand, type PlaybackConfig, type PlaybackEvent, WIRE_RATE } from "./messages";

export class PlaybackProcessor extends AudioWorkletProcessor {
  private readonly jitter: JitterBuffer;
  private readonly resampler: Resampler;
  private streaming: string | null = null; // the item whose audio is in the resampler
  private readonly progressFrames: number;
  private sinceProgress = 0;
  private dirty = false;

  constructor(options?: AudioWorkletNodeOptions) {
    super(options);
    const cfg = (options?.processorOptions ?? {}) as PlaybackConfig;
    this.jitter = new JitterBuffer({ sampleRate, prerollMs: cfg.prerollMs, maxPrerollMs: cfg.maxPrerollMs, fadeMs: cfg.fadeMs });
    this.resampler = new Resampler(WIRE_RATE, sampleRate);
    this.progressFrames = Math.round(((cfg.progressMs ?? 50) * sampleRate) / 1000);
    this.port.onmessage = (e: MessageEvent<PlaybackCommand>) => this.command(e.data);
  }

  command(msg: PlaybackCommand): void {
    switch (msg.type) {
      case "push": {
        if (this.streaming !== msg.itemId) this.closeStream();
        const native = this.resampler.process(pcm16ToFloat(msg.pcm));
        if (this.jitter.push(msg.itemId, native, msg.pcm.length)) this.streaming = msg.itemId;
        else this.resampler.reset(); // a flushed item's late audio
        break;
      }
      case "end":
        if (this.streaming === msg.itemId) this.closeStream();
        this.jitter.end(msg.itemId);
        break;
      case "flush": {
        this.resampler.reset();
        this.streaming = null;
        const played = this.jitter.flush();
        this.post({ type: "flushed", requestId: msg.requestId, played });
        this.reportProgress();
        break;
      }
    }
    this.dirty = true;
  }

  process(_inputs: Float32Array[][], outputs: Float32Array[][]): boolean {
    const channels = outputs[0];
    if (!channels || channels.length === 0) return true;
    const ev = this.jitter.render(channels[0]);
    for (let c = 1; c < channels.length; c++) channels[c].set(channels[0]);
    this.sinceProgress += channels[0].length;
    const changed = ev.started.length > 0 || ev.finished.length > 0 || ev.underrun || ev.drained;
    // Progress first, so the counts are final when the page hears "finished" or "drained".
    if (changed || (this.sinceProgress >= this.progressFrames && (this.dirty || this.jitter.playbackState !== "idle"))) {
      this.reportProgress();
    }
    for (const itemId of ev.started) this.post({ type: "started", itemId });
    if (ev.underrun) this.post({ type: "underrun" });
    for (const itemId of ev.finished) this.post({ type: "finished", itemId });
    if (ev.drained) this.post({ type: "drained" });
    return true;
  }

  /** The item in the resampler is over: its filter tail belongs to it, then a fresh stream. */
  private closeStream(): void {
    if (this.streaming === null) return;
    this.jitter.push(this.streaming, this.resampler.flush(), 0);
    this.streaming = null;
  }

  private reportProgress(): void {
    this.sinceProgress = 0;
    this.dirty = false;
    this.post({ type: "progress", stats: this.jitter.stats(), items: this.jitter.progress() });
  }

  private post(event: PlaybackEvent): void {
    this.port.postMessage(event);
  }
}

registerProcessor(PLAYBACK_PROCESSOR, PlaybackProcessor);
