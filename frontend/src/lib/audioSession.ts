/**
 * The browser's audio graph for one call: one AudioContext at the device's native rate, the capture
 * worklet (microphone → 24 kHz PCM16 chunks) and the playback worklet (reply audio → speakers), with an
 * analyser on each side for the visualizers. It is the client's `Player`.
 *
 * Create it inside the click that starts the call: the constructor creates and resumes the
 * AudioContext synchronously, which is what unlocks audio on iOS/Safari and satisfies autoplay rules.
 */

import captureUrl from "../worklets/capture.worklet.ts?worker&url";
import playbackUrl from "../worklets/playback.worklet.ts?worker&url";
import {
  CAPTURE_PROCESSOR,
  type CaptureChunk,
  type CaptureOptions,
  PLAYBACK_PROCESSOR,
  type PlaybackCommand,
  type PlaybackConfig,
  type PlaybackEvent,
} from "../worklets/messages";
import type { ItemProgress, JitterStats } from "./jitterBuffer";
import type { Player } from "./turnTracker";

export interface PlaybackListener {
  /** The microphone stopped delivering audio (unplugged, revoked). */
  microphoneEnded(): void;
  started(itemId: string): void;
  finished(itemId: string): void;
  drained(): void;
  progress(stats: JitterStats, items: ItemProgress[]): void;
}

export interface StartOptions {
  microphone: boolean;
  voiceProcessing: boolean;
  onAudio: (pcm: Int16Array) => void;
  playback?: PlaybackConfig;
  capture?: CaptureOptions;
}

/** getUserMedia failed: `kind` says whether permission was refused or there is no usable device. */
export class MicrophoneError extends Error {
  constructor(
    readonly kind: "mic-denied" | "mic-missing",
    message: string,
  ) {
    super(message);
  }
}

export class AudioSession implements Player {
  readonly context: AudioContext;
  readonly inputAnalyser: AnalyserNode;
  readonly outputAnalyser: AnalyserNode;
  stats: JitterStats | null = null;
  private playback: AudioWorkletNode | null = null;
  private capture: AudioWorkletNode | null = null;
  private source: MediaStreamAudioSourceNode | null = null;
  private stream: MediaStream | null = null;
  private queued: [PlaybackCommand, Transferable[]][] = [];
  private readonly flushes = new Map<number, (played: Record<string, number>) => void>();
  private flushSeq = 0;
  private closed = false;

  constructor(private readonly listener: PlaybackListener) {
    this.context = new AudioContext({ latencyHint: "interactive" });
    void this.context.resume();
    // Some browsers suspend audio (another app took the device, a phone call): ask for it back.
    this.context.onstatechange = () => {
      if (!this.closed && this.context.state === "suspended") void this.context.resume().catch(() => {});
    };
    this.inputAnalyser = new AnalyserNode(this.context, { fftSize: 512, smoothingTimeConstant: 0.6 });
    this.outputAnalyser = new AnalyserNode(this.context, { fftSize: 512, smoothingTimeConstant: 0.6 });
  }

  get sampleRate(): number {
    return this.context.sampleRate;
  }

  /** From a rendered frame to the speaker, as far as the browser knows. */
  get outputLatencyMs(): number {
    const ctx = this.context;
    return ((ctx.outputLatency || 0) + (ctx.baseLatency || 0)) * 1000;
  }

  async start(options: StartOptions): Promise<void> {
    const ctx = this.context;
    const modules = Promise.all([ctx.audioWorklet.addModule(captureUrl), ctx.audioWorklet.addModule(playbackUrl)]);
    const microphone = options.microphone ? openMicrophone(options.voiceProcessing) : Promise.resolve(null);
    const [, stream] = await Promise.all([modules, microphone]);
    if (this.closed) {
      stream?.getTracks().forEach((t) => t.stop());
      return;
    }
    this.stream = stream;
    stream?.getAudioTracks().forEach((track) => {
      track.onended = () => {
        if (!this.closed) this.listener.microphoneEnded();
      };
    });
    const playback = new AudioWorkletNode(ctx, PLAYBACK_PROCESSOR, {
      numberOfInputs: 0,
      numberOfOutputs: 1,
      outputChannelCount: [1],
      processorOptions: options.playback ?? {},
    });
    playback.port.onmessage = (e: MessageEvent<PlaybackEvent>) => this.onPlaybackEvent(e.data);
    playback.connect(this.outputAnalyser);
    this.outputAnalyser.connect(ctx.destination);
    this.playback = playback;
    for (const [command, transfer] of this.queued.splice(0)) playback.port.postMessage(command, transfer);
    if (stream !== null) {
      const source = ctx.createMediaStreamSource(stream);
      const capture = new AudioWorkletNode(ctx, CAPTURE_PROCESSOR, {
        numberOfInputs: 1,
        numberOfOutputs: 0,
        channelCount: 1,
        channelCountMode: "explicit",
        processorOptions: options.capture ?? { chunkMs: 40 },
      });
      capture.port.onmessage = (e: MessageEvent<CaptureChunk>) => {
        if (e.data?.type === "audio") options.onAudio(e.data.pcm);
      };
      source.connect(capture);
      source.connect(this.inputAnalyser);
      this.source = source;
      this.capture = capture;
    }
  }

  push(itemId: string, pcm: Int16Array): void {
    this.post({ type: "push", itemId, pcm }, [pcm.buffer as ArrayBuffer]);
  }

  end(itemId: string): void {
    this.post({ type: "end", itemId }, []);
  }

  flush(): Promise<Record<string, number>> {
    if (this.playback === null) {
      this.queued = [];
      return Promise.resolve({});
    }
    const requestId = ++this.flushSeq;
    return new Promise((resolve) => {
      this.flushes.set(requestId, resolve);
      this.post({ type: "flush", requestId }, []);
    });
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.stream?.getTracks().forEach((t) => t.stop());
    this.source?.disconnect();
    this.capture?.port.close();
    this.playback?.port.close();
    this.playback?.disconnect();
    for (const resolve of this.flushes.values()) resolve({});
    this.flushes.clear();
    try {
      await this.context.close();
    } catch {
      // already closed
    }
  }

  private post(command: PlaybackCommand, transfer: Transferable[]): void {
    if (this.closed) return;
    if (this.playback === null) this.queued.push([command, transfer]);
    else this.playback.port.postMessage(command, transfer);
  }

  private onPlaybackEvent(event: PlaybackEvent): void {
    switch (event.type) {
      case "started":
        this.listener.started(event.itemId);
        break;
      case "finished":
        this.listener.finished(event.itemId);
        break;
      case "drained":
        this.listener.drained();
        break;
      case "progress":
        this.stats = event.stats;
        this.listener.progress(event.stats, event.items);
        break;
      case "flushed": {
        const resolve = this.flushes.get(event.requestId);
        this.flushes.delete(event.requestId);
        resolve?.(event.played);
        break;
      }
      case "underrun":
        break;
    }
  }
}

async function openMicrophone(voiceProcessing: boolean): Promise<MediaStream> {
  if (!navigator.mediaDevices?.getUserMedia) {
    throw new MicrophoneError("mic-missing", "This browser cannot use a microphone here (a secure https:// page is needed).");
  }
  try {
    return await navigator.mediaDevices.getUserMedia({
      audio: {
        channelCount: 1,
        echoCancellation: voiceProcessing,
        noiseSuppression: voiceProcessing,
        autoGainControl: voiceProcessing,
      },
    });
  } catch (e) {
    const name = (e as DOMException)?.name;
    if (name === "NotAllowedError" || name === "SecurityError") {
      throw new MicrophoneError("mic-denied", "Microphone access was blocked.");
    }
    if (name === "NotFoundError" || name === "OverconstrainedError" || name === "NotReadableError") {
      throw new MicrophoneError("mic-missing", name === "NotReadableError" ? "The microphone is in use by another application." : "No microphone was found.");
    }
    throw e;
  }
}
