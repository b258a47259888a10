/** Fakes for the client's parts: a socket the test drives, a clock and timers it controls, a player that records. */

import type { SocketLike } from "../lib/connection";
import { pcm16ToBase64 } from "../lib/pcm";
import { SEQ_FIELD } from "../lib/protocol";
import type { Player } from "../lib/turnTracker";

export class FakeSocket implements SocketLike {
  readyState = 0;
  bufferedAmount = 0;
  sent: Record<string, unknown>[] = [];
  closedWith: { code?: number; reason?: string } | null = null;
  onopen: ((ev: Event) => unknown) | null = null;
  onmessage: ((ev: MessageEvent) => unknown) | null = null;
  onclose: ((ev: CloseEvent) => unknown) | null = null;
  onerror: ((ev: Event) => unknown) | null = null;
  constructor(readonly url: string) {}
  /** Each sent event's `x-seq`, kept apart so that `sent` holds the events as the client built them. */
  seqs: unknown[] = [];
  send(data: string): void {
    const { [SEQ_FIELD]: seq, ...event } = JSON.parse(data);
    this.seqs.push(seq);
    this.sent.push(event);
  }
  close(code?: number, reason?: string): void {
    this.closedWith = { code, reason };
    this.readyState = 3;
  }
  // The server's side:
  open(): void {
    this.readyState = 1;
    this.onopen?.(new Event("open"));
  }
  receive(event: Record<string, unknown>): void {
    this.onmessage?.({ data: JSON.stringify(event) } as MessageEvent);
  }
  drop(code: number, reason = ""): void {
    this.readyState = 3;
    this.onclose?.({ code, reason } as CloseEvent);
  }
  types(): string[] {
    return this.sent.map((e) => e.type as string);
  }
}

export class Clock {
  now = 0;
  private timers: { at: number; fn: () => void; id: number }[] = [];
  private seq = 0;
  setTimeout = (fn: () => void, ms: number): number => {
    this.timers.push({ at: this.now + ms, fn, id: ++this.seq });
    return this.seq;
  };
  clearTimeout = (id: unknown): void => {
    this.timers = this.timers.filter((t) => t.id !== id);
  };
  advance(ms: number): void {
    const end = this.now + ms;
    for (;;) {
      const next = this.timers.filter((t) => t.at <= end).sort((a, b) => a.at - b.at)[0];
      if (!next) break;
      this.timers = this.timers.filter((t) => t !== next);
      this.now = next.at;
      next.fn();
    }
    this.now = end;
  }
  get pending(): number {
    return this.timers.length;
  }
}

export class FakePlayer implements Player {
  pushed: { itemId: string; samples: number }[] = [];
  ended: string[] = [];
  flushes = 0;
  flushResult: Record<string, number> = {};
  push(itemId: string, pcm: Int16Array): void {
    this.pushed.push({ itemId, samples: pcm.length });
  }
  end(itemId: string): void {
    this.ended.push(itemId);
  }
  flush(): Promise<Record<string, number>> {
    this.flushes++;
    return Promise.resolve({ ...this.flushResult });
  }
}

/** Let pending promise callbacks run. */
export const settle = () => new Promise((resolve) => setTimeout(resolve, 0));

/** `samples` of reply audio as a base64 delta. */
export const audio = (samples: number) => pcm16ToBase64(new Int16Array(samples).fill(100));

/** The options both the connection's and the client's tests start from: sockets go into `sockets`, time is `clock`'s. */
export function fakeEndpoint(sockets: FakeSocket[], clock: Clock) {
  return {
    endpoint: "ws://127.0.0.1:9999/v1/realtime",
    token: "s3cret",
    createSocket: (url: string) => {
      const s = new FakeSocket(url);
      sockets.push(s);
      return s;
    },
    timers: clock,
    random: () => 0.5, // no jitter: delays are exactly base × 2^n
  };
}
