import { describe, expect, it } from "vitest";
import { Resampler, resample } from "../lib/resampler";
import { concat, rng, sine, toneAmplitude } from "./signal";

const interior = (x: Float32Array, margin: number): [number, number] => [margin, x.length - margin];

describe("Resampler: frequency response", () => {
  it.each([
    [48000, 24000],
    [44100, 24000],
    [16000, 24000],
    [24000, 48000],
    [24000, 44100],
  ])("%i → %i Hz keeps a 1 kHz tone at its amplitude and in time", (inRate, outRate) => {
    const input = sine(1000, inRate, 0.5, 0.5);
    const out = resample(input, inRate, outRate);
    const expected = sine(1000, outRate, 0.5, 0.5);
    expect(out.length).toBe(Math.ceil((input.length * outRate) / inRate));
    const [a, b] = interior(out, 200);
    expect(toneAmplitude(out, 1000, outRate, a, b)).toBeCloseTo(0.5, 2);
    // No delay: the output is the same sine sampled at the new rate.
    let worst = 0;
    for (let i = a; i < b; i++) worst = Math.max(worst, Math.abs(out[i] - expected[i]));
    expect(worst).toBeLessThan(2e-3);
  });

  it("passes speech frequencies flat (≤0.1 dB up to 8 kHz) at 48 → 24 kHz", () => {
    for (const f of [100, 300, 1000, 3000, 6000, 8000]) {
      const out = resample(sine(f, 48000, 0.3, 0.5), 48000, 24000);
      const [a, b] = interior(out, 300);
      const db = 20 * Math.log10(toneAmplitude(out, f, 24000, a, b) / 0.5);
      expect(Math.abs(db), `${f} Hz`).toBeLessThan(0.1);
    }
  });

  it.each([
    [48000, 13000],
    [48000, 15000],
    [48000, 20000],
    [44100, 14000],
    [44100, 18000],
  ])("%i → 24000 Hz attenuates a %i Hz tone (above the new Nyquist) by ≥ 60 dB", (inRate, f) => {
    const out = resample(sine(f, inRate, 0.5, 0.5), inRate, 24000);
    const [a, b] = interior(out, 300);
    // Wherever it would alias to, there is (almost) nothing left.
    let peak = 0;
    for (let i = a; i < b; i++) peak = Math.max(peak, Math.abs(out[i]));
    expect(20 * Math.log10(peak / 0.5)).toBeLessThan(-60);
  });

  it("24 → 48 kHz leaves no image above 12 kHz", () => {
    const out = resample(sine(1000, 24000, 0.5, 0.5), 24000, 48000);
    const [a, b] = interior(out, 400);
    // A naive zero-stuffing upsampler would put an image of 1 kHz at 23 kHz.
    expect(toneAmplitude(out, 23000, 48000, a, b)).toBeLessThan(0.5e-3);
    expect(toneAmplitude(out, 1000, 48000, a, b)).toBeCloseTo(0.5, 2);
  });

  it("keeps DC exactly", () => {
    const out = resample(new Float32Array(4800).fill(0.25), 48000, 24000);
    for (let i = 100; i < out.length - 100; i++) expect(out[i]).toBeCloseTo(0.25, 6);
  });

  it("is a plain copy at equal rates", () => {
    const x = sine(440, 24000, 0.1);
    const r = new Resampler(24000, 24000);
    expect(r.process(x)).toEqual(x);
    expect(r.flush().length).toBe(0);
  });
});

describe("Resampler: streaming", () => {
  it.each([
    [48000, 24000],
    [44100, 24000],
    [24000, 48000],
    [24000, 44100],
    [22050, 24000],
  ])("%i → %i Hz: chunks of any size give exactly the one-shot result", (inRate, outRate) => {
    const random = rng(inRate + outRate);
    const input = new Float32Array(Math.round(inRate * 0.4)).map(() => random() * 2 - 1);
    const whole = resample(input, inRate, outRate);
    const r = new Resampler(inRate, outRate);
    const parts: Float32Array[] = [];
    for (let at = 0; at < input.length; ) {
      const n = Math.min(input.length - at, [0, 1, 7, 128, 333, 1920][Math.floor(random() * 6)]);
      parts.push(r.process(input.subarray(at, at + n)));
      at += n;
    }
    parts.push(r.flush());
    const streamed = concat(parts);
    expect(streamed.length).toBe(whole.length);
    let worst = 0;
    for (let i = 0; i < whole.length; i++) worst = Math.max(worst, Math.abs(streamed[i] - whole[i]));
    expect(worst).toBe(0);
  });

  it("never drifts: 60 s of 44.1 kHz in 128-frame blocks is exactly 60 s at 24 kHz", () => {
    const r = new Resampler(44100, 24000);
    const block = new Float32Array(128);
    let produced = 0;
    const blocks = (44100 * 60) / 128;
    for (let i = 0; i < Math.floor(blocks); i++) produced += r.process(block).length;
    produced += r.process(new Float32Array(44100 * 60 - Math.floor(blocks) * 128)).length;
    produced += r.flush().length;
    expect(produced).toBe(24000 * 60);
  });

  it("a tone is continuous across chunk boundaries", () => {
    const input = sine(440, 48000, 0.2, 0.8);
    const r = new Resampler(48000, 24000);
    const out = concat([0, 128, 256, 384, 512].map((_, k) => r.process(input.subarray(k * 128, (k + 1) * 128))).concat([r.process(input.subarray(640))]));
    const expected = sine(440, 24000, 0.2, 0.8);
    for (let i = 48; i < out.length; i++) expect(Math.abs(out[i] - expected[i])).toBeLessThan(2e-3);
  });

  it("reset starts a new stream", () => {
    const r = new Resampler(48000, 24000);
    const x = sine(1000, 48000, 0.05);
    const first = concat([r.process(x), r.flush()]);
    const second = concat([r.process(x), r.flush()]);
    expect(second).toEqual(first);
  });

  it("rejects nonsense rates", () => {
    expect(() => new Resampler(0, 24000)).toThrow(RangeError);
    expect(() => new Resampler(44100.5, 24000)).toThrow(RangeError);
  });
});
