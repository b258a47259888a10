/**
 * The two AudioWorklet processors, run outside a browser: `AudioWorkletProcessor`, `registerProcessor`
 * and `sampleRate` are stubbed as globals, then the worklet modules are imported fresh.
 */
import { afterEach, describe, expect, it, vi } from "vitest";
import { floatToPcm16 } from "../lib/pcm";
import { resample } from "../lib/resampler";
import type { PlaybackEvent } from "../worklets/messages";
import { sine } from "./signal";

class FakePort {
  posted: unknown[] = [];
  onmessage: ((e: MessageEvent) => void) | null = null;
  postMessage(message: unknown): void {
    this.posted.push(message);
  }
  deliver(message: unknown): void {
    this.onmessage?.({ data: message } as MessageEvent);
  }
}

type Processor = {
  port: FakePort;
  process(inputs: Float32Array[][], outputs: Float32Array[][]): boolean;
};
type ProcessorClass = new (options?: { processorOptions?: unknown }) => Processor;

async function loadWorklet(module: "capture" | "playback", rate: number): Promise<{ name: string; Processor: ProcessorClass }> {
  const registered: Record<string, ProcessorClass> = {};
  vi.resetModules();
  vi.stubGlobal(
    "AudioWorkletProcessor",
    class {
      port = new FakePort();
    },
  );
  vi.stubGlobal("registerProcessor", (name: string, ctor: ProcessorClass) => {
    registered[name] = ctor;
  });
  vi.stubGlobal("sampleRate", rate);
  if (module === "capture") await import("../worklets/capture.worklet");
  else await import("../worklets/playback.worklet");
  const [name, Processor] = Object.entries(registered)[0];
  return { name, Processor };
}

afterEach(() => {
  vi.unstubAllGlobals();
});

describe("capture worklet", () => {
  it("registers as csm-capture", async () => {
    expect((await loadWorklet("capture", 48000)).name).toBe("csm-capture");
  });

  it.each([48000, 44100])("turns %i Hz blocks into 40 ms chunks of 24 kHz PCM16, equal to a one-shot resample", async (rate) => {
    const { Processor } = await loadWorklet("capture", rate);
    const p = new Processor({ processorOptions: { chunkMs: 40 } });
    const input = sine(440, rate, 1.0, 0.5);
    for (let at = 0; at + 128 <= input.length; at += 128) {
      expect(p.process([[input.subarray(at, at + 128)]], [])).toBe(true);
    }
    const chunks = p.port.posted as { type: string; pcm: Int16Array }[];
    expect(chunks.length).toBeGreaterThanOrEqual(24); // ~1 s minus the filter's 1 ms look-ahead
    expect(chunks.every((c) => c.type === "audio" && c.pcm.length === 960)).toBe(true);
    const got = new Int16Array(chunks.length * 960);
    chunks.forEach((c, k) => got.set(c.pcm, k * 960));
    const expected = floatToPcm16(resample(input.subarray(0, Math.floor(input.length / 128) * 128), rate, 24000));
    let worst = 0;
    for (let i = 0; i < got.length; i++) worst = Math.max(worst, Math.abs(got[i] - expected[i]));
    expect(worst).toBeLessThanOrEqual(1);
  });

  it("mixes channels to mono and waits quietly without input", async () => {
    const { Processor } = await loadWorklet("capture", 24000);
    const p = new Processor({ processorOptions: { chunkMs: 20 } });
    expect(p.process([], [])).toBe(true);
    expect(p.process([[]], [])).toBe(true);
    const x = sine(300, 24000, 0.1, 0.5);
    const neg = x.map((v) => -v);
    for (let at = 0; at + 128 <= x.length; at += 128) p.process([[x.subarray(at, at + 128), neg.subarray(at, at + 128)]], []);
    const chunks = p.port.posted as { pcm: Int16Array }[];
    expect(chunks.length).toBe(4); // 18 blocks of 128 = 2304 samples = 4 chunks of 480
    expect(chunks.every((c) => c.pcm.length === 480 && c.pcm.every((s) => s === 0))).toBe(true);
  });

  it("clamps the chunk size to 20–80 ms", async () => {
    const { Processor } = await loadWorklet("capture", 24000);
    const p = new Processor({ processorOptions: { chunkMs: 500 } });
    const x = new Float32Array(128).fill(0.1);
    for (let k = 0; k < 40; k++) p.process([[x]], []);
    expect((p.port.posted[0] as { pcm: Int16Array }).pcm.length).toBe(1920);
  });
});

describe("playback worklet", () => {
  const wire = (n: number, value = 8000) => new Int16Array(n).fill(value);

  function render(p: Processor, blocks: number, channels = 1): Float32Array {
    const out = new Float32Array(blocks * 128);
    for (let b = 0; b < blocks; b++) {
      const outputs = [Array.from({ length: channels }, () => new Float32Array(128))];
      expect(p.process([], outputs)).toBe(true);
      out.set(outputs[0][0], b * 128);
      for (let c = 1; c < channels; c++) expect(outputs[0][c]).toEqual(outputs[0][0]);
    }
    return out;
  }

  const events = (p: Processor) => p.port.posted as PlaybackEvent[];

  it("registers as csm-playback", async () => {
    expect((await loadWorklet("playback", 48000)).name).toBe("csm-playback");
  });

  it("plays a reply at 48 kHz, reports start, progress in wire samples, finish and drain", async () => {
    const { Processor } = await loadWorklet("playback", 48000);
    const p = new Processor({ processorOptions: { prerollMs: 100 } });
    for (let k = 0; k < 3; k++) p.port.deliver({ type: "push", itemId: "item_1", pcm: wire(1920) }); // 240 ms
    p.port.deliver({ type: "end", itemId: "item_1" });
    const audio = render(p, 100); // 266 ms at 48 kHz
    const ev = events(p);
    expect(ev.filter((e) => e.type === "started")).toEqual([{ type: "started", itemId: "item_1" }]);
    expect(ev.filter((e) => e.type === "finished")).toEqual([{ type: "finished", itemId: "item_1" }]);
    expect(ev.some((e) => e.type === "drained")).toBe(true);
    const last = ev.filter((e) => e.type === "progress").at(-1) as Extract<PlaybackEvent, { type: "progress" }>;
    expect(last.stats.totalPlayed).toBe(5760);
    expect(last.items).toContainEqual(expect.objectContaining({ itemId: "item_1", received: 5760, played: 5760, finished: true }));
    // 240 ms of a constant at 48 kHz: ~11520 frames at the value (fades and the filter's edges aside).
    const value = 8000 / 32768;
    const steady = audio.filter((s) => Math.abs(s - value) < 1e-3).length;
    expect(steady).toBeGreaterThan(11000);
    // The order the page relies on: progress with final counts, then "finished".
    const finishedAt = ev.findIndex((e) => e.type === "finished");
    expect(ev.slice(0, finishedAt).some((e) => e.type === "progress" && e.items.some((i) => i.played === 5760))).toBe(true);
  });

  it("flush answers with what was played, then fades to silence", async () => {
    const { Processor } = await loadWorklet("playback", 48000);
    const p = new Processor({ processorOptions: { prerollMs: 100 } });
    for (let k = 0; k < 20; k++) p.port.deliver({ type: "push", itemId: "item_2", pcm: wire(1920) });
    render(p, 60); // 160 ms
    p.port.deliver({ type: "flush", requestId: 7 });
    const flushed = events(p).find((e) => e.type === "flushed") as Extract<PlaybackEvent, { type: "flushed" }>;
    expect(flushed.requestId).toBe(7);
    const heard = flushed.played.item_2;
    expect(heard).toBeGreaterThan(0.15 * 24000);
    expect(heard).toBeLessThan(0.2 * 24000);
    const after = render(p, 10);
    expect(Math.abs(after[0])).toBeLessThan(8000 / 32768);
    expect(after.slice(240).every((s) => s === 0)).toBe(true); // 5 ms fade at 48 kHz
    // Late audio for the flushed item is dropped.
    p.port.deliver({ type: "push", itemId: "item_2", pcm: wire(1920) });
    expect(render(p, 40).every((s) => s === 0)).toBe(true);
  });

  it("at the context's own 24 kHz, frames and wire samples are the same", async () => {
    const { Processor } = await loadWorklet("playback", 24000);
    const p = new Processor();
    p.port.deliver({ type: "push", itemId: "x", pcm: wire(1000) });
    p.port.deliver({ type: "end", itemId: "x" });
    const audio = render(p, 10, 2);
    expect(audio.filter((s) => s !== 0).length).toBeGreaterThanOrEqual(1000);
    const last = events(p).filter((e) => e.type === "progress").at(-1) as Extract<PlaybackEvent, { type: "progress" }>;
    expect(last.stats.totalPlayed).toBe(1000);
  });

  it("a new item closes the previous one's stream, whose tail still plays", async () => {
    const { Processor } = await loadWorklet("playback", 44100);
    const p = new Processor({ processorOptions: { prerollMs: 20 } });
    p.port.deliver({ type: "push", itemId: "a", pcm: wire(2400) });
    p.port.deliver({ type: "push", itemId: "b", pcm: wire(2400) });
    p.port.deliver({ type: "end", itemId: "b" });
    render(p, 80);
    const ev = events(p);
    expect(ev.filter((e) => e.type === "finished").map((e) => (e as { itemId: string }).itemId)).toEqual(["a", "b"]);
    const last = ev.filter((e) => e.type === "progress").at(-1) as Extract<PlaybackEvent, { type: "progress" }>;
    expect(last.stats.totalPlayed).toBe(4800);
  });
});
