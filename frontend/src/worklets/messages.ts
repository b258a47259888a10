/** Messages between the page and the two worklets (structured-clone safe). */

import type { ItemProgress, JitterStats } from "../lib/jitterBuffer";

export const CAPTURE_PROCESSOR = "csm-capture";
export const PLAYBACK_PROCESSOR = "csm-playback";
/** The wire's sample rate (Mimi's): PCM16 mono at 24 kHz both ways. */
export const WIRE_RATE = 24_000;

export interface CaptureOptions {
  /** Milliseconds of 24 kHz audio per message (20–80: one `input_audio_buffer.append` each). */
  chunkMs: number;
}

/** capture worklet → page: one chunk of the microphone at 24 kHz PCM16. */
export interface CaptureChunk {
  type: "audio";
  pcm: Int16Array;
}

export interface PlaybackConfig {
  prerollMs?: number;
  maxPrerollMs?: number;
  fadeMs?: number;
  /** How often progress is reported, in milliseconds. */
  progressMs?: number;
}

/** page → playback worklet. */
export type PlaybackCommand =
  | { type: "push"; itemId: string; pcm: Int16Array }
  | { type: "end"; itemId: string }
  | { type: "flush"; requestId: number };

/** playback worklet → page. */
export type PlaybackEvent =
  | { type: "started"; itemId: string }
  | { type: "finished"; itemId: string }
  | { type: "underrun" }
  | { type: "drained" }
  | { type: "flushed"; requestId: number; played: Record<string, number> }
  | { type: "progress"; stats: JitterStats; items: ItemProgress[] };
