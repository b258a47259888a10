/**
 * `window.__csm`: read-only counters for the browser tests (and for anyone debugging in the console).
 * Every value is read when asked, from the client and the playback worklet's latest report.
 */

import type { AudioSession } from "./lib/audioSession";
import type { RealtimeClient } from "./lib/realtimeClient";
import type { SignInSnapshot } from "./lib/signIn";

export interface CsmTestHook {
  readonly phase: string;
  /** Wire (24 kHz) samples the playback worklet has played, all replies together. */
  readonly totalPlayed: number;
  readonly playedByItem: Record<string, number>;
  readonly receivedByItem: Record<string, number>;
  /** `conversation.item.truncate` events sent, and the server's `conversation.item.truncated` answers. */
  readonly truncates: { itemId: string; audioEndMs: number; reason: string }[];
  readonly truncated: { itemId: string; audioEndMs: number }[];
  readonly flushes: { reason: string; played: Record<string, number> }[];
  readonly events: string[];
  readonly timeline: [number, string][];
  readonly sent: Record<string, number>;
  readonly latencies: readonly number[];
  readonly player: { state: string; bufferedMs: number; prerollMs: number; underruns: number } | null;
  readonly sampleRate: number | null;
  /** Sign-in (config.json's `auth`), without the tokens; null when the page has no sign-in. */
  readonly signIn: { status: string; username: string | null; refreshes: number; expiresAt: number | null } | null;
}

declare global {
  interface Window {
    __csm?: CsmTestHook;
  }
}

export function installTestHook(
  client: RealtimeClient,
  audio: () => AudioSession | null,
  signIn: () => SignInSnapshot | null = () => null,
): void {
  const d = client.debug;
  window.__csm = {
    get phase() {
      return client.getSnapshot().phase;
    },
    get totalPlayed() {
      return audio()?.stats?.totalPlayed ?? 0;
    },
    get playedByItem() {
      return { ...d.playedByItem };
    },
    get receivedByItem() {
      return { ...d.receivedByItem };
    },
    get truncates() {
      return [...d.truncates];
    },
    get truncated() {
      return [...d.truncated];
    },
    get flushes() {
      return [...d.flushes];
    },
    get events() {
      return [...d.events];
    },
    get timeline() {
      return [...d.timeline];
    },
    get sent() {
      return { ...d.sent };
    },
    get latencies() {
      return client.getSnapshot().latencies;
    },
    get player() {
      const s = audio()?.stats;
      return s ? { state: s.state, bufferedMs: s.bufferedMs, prerollMs: s.prerollMs, underruns: s.underruns } : null;
    },
    get sampleRate() {
      return audio()?.sampleRate ?? null;
    },
    get signIn() {
      const s = signIn();
      return s ? { status: s.status, username: s.username, refreshes: s.refreshes, expiresAt: s.expiresAt } : null;
    },
  };
}
