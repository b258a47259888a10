/**
 * Microphone capture on the audio thread: the device's audio at the context's native rate, mixed to
 * mono, resampled by our own filter to 24 kHz, converted to PCM16 and posted to the page in fixed
 * chunks (`chunkMs`, 40 ms by default), each of which becomes one `input_audio_buffer.append`.
 */

import { floatToPcm16 } from "../lib/pcm";
import { Resampler } from "../lib/resampler";
import { CAPTURE_PROCESSOR, type CaptureChunk, type CaptureOptions, WIRE_RATE } from "./messages";

export class CaptureProcessor extends AudioWorkletProcessor {
  private readonly resampler: Resampler;
  private readonly chunkSamples: number;
  private chunk: Int16Array;
  private filled = 0;
  private mono = new Float32Array(128);

  constructor(options?: AudioWorkletNodeOptions) {
    super(options);
    const opts = (options?.processorOptions ?? {}) as Partial<CaptureOptions>;
    const chunkMs = Math.min(80, Math.max(20, opts.chunkMs ?? 40));
    this.chunkSamples = Math.round((WIRE_RATE * chunkMs) / 1000);
    this.chunk = new Int16Array(this.chunkSamples);
    this.resampler = new Resampler(sampleRate, WIRE_RATE);
    this.port.onmessage = (e: MessageEvent<{ type: string }>) => {
      if (e.data?.type === "reset") {
        this.resampler.reset();
        this.filled = 0;
      }
    };
  }

  process(inputs: Float32Array[][]): boolean {
    const channels = inputs[0];
    if (!channels || channels.length === 0 || channels[0].length === 0) return true; // no source yet
    const frames = channels[0].length;
    if (this.mono.length !== frames) this.mono = new Float32Array(frames);
    const mono = this.mono;
    if (channels.length === 1) mono.set(channels[0]);
    else {
      mono.fill(0);
      for (const ch of channels) for (let i = 0; i < frames; i++) mono[i] += ch[i];
      for (let i = 0; i < frames; i++) mono[i] /= channels.length;
    }
    const pcm = floatToPcm16(this.resampler.process(mono));
    let at = 0;
    while (at < pcm.length) {
      const take = Math.min(pcm.length - at, this.chunkSamples - this.filled);
      this.chunk.set(pcm.subarray(at, at + take), this.filled);
      this.filled += take;
      at += take;
      if (this.filled === this.chunkSamples) {
        const message: CaptureChunk = { type: "audio", pcm: this.chunk };
        this.port.postMessage(message, [this.chunk.buffer]);
        this.chunk = new Int16Array(this.chunkSamples);
        this.filled = 0;
      }
    }
    return true;
  }
}

registerProcessor(CAPTURE_PROCESSOR, CaptureProcessor);
