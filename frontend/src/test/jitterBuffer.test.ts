import { describe, expect, it } from "vitest";
import { JitterBuffer, type RenderEvents } from "../lib/jitterBuffer";

// 8 kHz keeps the numbers small: 120 ms pre-roll = 960 frames, 5 ms fade = 40 frames.
const RATE = 8000;
const BLOCK = 128;

function make(options: Partial<ConstructorParameters<typeof JitterBuffer>[0]> = {}) {
  return new JitterBuffer({ sampleRate: RATE, prerollMs: 120, maxPrerollMs: 400, fadeMs: 5, ...options });
}

const ones = (n: number, v = 0.5) => new Float32Array(n).fill(v);

/** Render `blocks` blocks; the audio and every event, copied. */
function run(jb: JitterBuffer, blocks: number) {
  const audio: number[] = [];
  const events: RenderEvents[] = [];
  for (let b = 0; b < blocks; b++) {
    const out = new Float32Array(BLOCK);
    const ev = jb.render(out);
    events.push({ started: [...ev.started], finished: [...ev.finished], underrun: ev.underrun, drained: ev.drained });
    audio.push(...out);
  }
  const all = (key: "started" | "finished") => events.flatMap((e) => e[key]);
  return { audio, events, started: all("started"), finished: all("finished"), underruns: events.filter((e) => e.underrun).length, drained: events.some((e) => e.drained) };
}

describe("JitterBuffer: pre-roll", () => {
  it("waits for the pre-roll, then starts with a fade-in", () => {
    const jb = make();
    jb.push("a", ones(500));
    let r = run(jb, 2);
    expect(r.audio.every((s) => s === 0)).toBe(true);
    expect(jb.playbackState).toBe("buffering");
    jb.push("a", ones(500));
    r = run(jb, 1);
    expect(jb.playbackState).toBe("playing");
    expect(r.started).toEqual(["a"]);
    // Fade-in: rising over the first 40 frames, then the signal itself.
    for (let i = 1; i < 40; i++) expect(r.audio[i]).toBeGreaterThan(r.audio[i - 1]);
    expect(r.audio[0]).toBeLessThan(0.05);
    expect(r.audio[40]).toBe(0.5);
  });

  it("a complete reply shorter than the pre-roll plays at once and to its end", () => {
    const jb = make();
    jb.push("short", ones(300), 150);
    jb.end("short");
    const r = run(jb, 4);
    expect(r.started).toEqual(["short"]);
    expect(r.finished).toEqual(["short"]);
    expect(r.drained).toBe(true);
    expect(r.underruns).toBe(0);
    expect(jb.playbackState).toBe("idle");
    expect(jb.played("short")).toBe(150);
  });

  it("ends with a ramp from the last sample to silence, never a jump", () => {
    const jb = make();
    jb.push("a", ones(200, 0.8));
    jb.end("a");
    const { audio } = run(jb, 3);
    const end = 200;
    expect(audio[end - 1]).toBeCloseTo(0.8, 5);
    for (let i = end; i < end + 40; i++) {
      expect(audio[i]).toBeLessThan(audio[i - 1]);
      expect(audio[i - 1] - audio[i]).toBeLessThan(0.8 / 40 + 1e-6);
    }
    expect(audio.slice(end + 40).every((s) => s === 0)).toBe(true);
  });
});

describe("JitterBuffer: underruns", () => {
  it("running dry mid-reply is an underrun: the pre-roll grows, playback waits for it, then fades in", () => {
    const jb = make();
    jb.push("a", ones(1000));
    let r = run(jb, 10); // 1280 frames: plays 1000, then runs dry
    expect(r.underruns).toBe(1);
    expect(r.drained).toBe(false);
    expect(jb.playbackState).toBe("buffering");
    expect(jb.stats().prerollMs).toBeCloseTo(180, 5);
    jb.push("a", ones(1000));
    r = run(jb, 2);
    expect(r.audio.every((s) => s === 0)).toBe(true); // 1000 < 1440 frames: still buffering
    jb.push("a", ones(500));
    r = run(jb, 1);
    expect(jb.playbackState).toBe("playing");
    expect(r.audio[0]).toBeLessThan(0.05);
    expect(r.audio[60]).toBe(0.5);
    expect(r.started).toEqual([]); // the same item goes on
  });

  it("the pre-roll growth is bounded", () => {
    const jb = make();
    for (let k = 0; k < 10; k++) {
      jb.push("a", ones(4000));
      run(jb, 40);
    }
    expect(jb.stats().underruns).toBe(10);
    expect(jb.stats().prerollMs).toBe(400);
  });

  it("relaxes toward the base pre-roll after replies that played cleanly", () => {
    const jb = make();
    jb.push("a", ones(1000));
    run(jb, 10); // underrun: 180 ms
    jb.push("a", ones(2000));
    jb.end("a");
    run(jb, 20);
    expect(jb.stats().prerollMs).toBeCloseTo(180, 5); // that reply had an underrun: no relief
    for (const id of ["b", "c", "d"]) {
      jb.push(id, ones(2000));
      jb.end(id);
      run(jb, 20);
    }
    expect(jb.stats().prerollMs).toBeCloseTo(120, 5);
  });

  it("an end that arrives after running dry finishes the item without waiting", () => {
    const jb = make();
    jb.push("a", ones(1000));
    run(jb, 10);
    jb.end("a");
    const r = run(jb, 1);
    expect(r.finished).toEqual(["a"]);
    expect(r.drained).toBe(true);
    expect(jb.playbackState).toBe("idle");
  });
});

describe("JitterBuffer: accounting", () => {
  it("credits source samples as frames play, exactly at the end", () => {
    const jb = make();
    // 2 frames per source sample (e.g. 24 kHz on the wire, 48 kHz out).
    jb.push("a", ones(1000), 500);
    jb.push("a", ones(1000), 500);
    jb.end("a");
    run(jb, 4); // 512 frames
    expect(jb.played("a")).toBe(256);
    run(jb, 20);
    expect(jb.played("a")).toBe(1000);
    expect(jb.stats().totalPlayed).toBe(1000);
    const item = jb.progress().find((p) => p.itemId === "a");
    expect(item).toMatchObject({ received: 1000, played: 1000, ended: true, finished: true });
  });

  it("plays replies back to back without a gap, and reports each", () => {
    const jb = make();
    jb.push("a", ones(600, 0.25));
    jb.push("b", ones(600, 0.75)); // a new item closes the previous one
    jb.end("b");
    const r = run(jb, 12);
    expect(r.started).toEqual(["a", "b"]);
    expect(r.finished).toEqual(["a", "b"]);
    expect(r.underruns).toBe(0);
    expect(r.audio[599]).toBe(0.25);
    expect(r.audio[600]).toBe(0.75);
    expect(jb.played("a")).toBe(600);
    expect(jb.played("b")).toBe(600);
  });

  it("zero-length chunks (a resampler still filling) are credited with the next", () => {
    const jb = make();
    jb.push("a", new Float32Array(0), 3);
    jb.push("a", ones(100), 97);
    jb.end("a");
    run(jb, 2);
    expect(jb.played("a")).toBe(100);
  });
});

describe("JitterBuffer: flush", () => {
  it("fades out over 5 ms, drops the rest, and reports what was heard", () => {
    const jb = make();
    jb.push("a", ones(4000, 0.6), 2000);
    run(jb, 10); // 1280 frames played
    const played = jb.flush();
    expect(played).toEqual({ a: Math.floor(((1280 + 40) * 2000) / 4000) });
    expect(jb.playbackState).toBe("idle");
    const { audio } = run(jb, 2);
    expect(audio[0]).toBeLessThanOrEqual(0.6);
    for (let i = 1; i < 40; i++) expect(audio[i]).toBeLessThan(audio[i - 1]);
    expect(audio[39]).toBeLessThan(0.6 / 20);
    expect(audio.slice(40).every((s) => s === 0)).toBe(true);
    expect(jb.stats().bufferedFrames).toBe(0);
  });

  it("ignores audio that still arrives for a flushed item, but takes a new one", () => {
    const jb = make();
    jb.push("a", ones(2000));
    run(jb, 10);
    jb.flush();
    expect(jb.push("a", ones(2000))).toBe(false);
    jb.end("a");
    expect(run(jb, 10).started).toEqual([]);
    expect(jb.push("b", ones(2000))).toBe(true);
    expect(run(jb, 10).started).toEqual(["b"]);
  });

  it("reports only items that had not finished; a flush while buffering plays nothing", () => {
    const jb = make();
    jb.push("done", ones(200));
    jb.end("done");
    run(jb, 3);
    jb.push("waiting", ones(100));
    expect(jb.flush()).toEqual({ waiting: 0 });
    expect(run(jb, 2).audio.every((s) => s === 0)).toBe(true);
  });

  it("a flush with nothing queued returns nothing", () => {
    expect(make().flush()).toEqual({});
  });
});
