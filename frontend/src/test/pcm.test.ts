import { describe, expect, it } from "vitest";
import { base64ToBytes, base64ToPcm16, bytesToBase64, floatToPcm16, pcm16ToBase64, pcm16ToFloat } from "../lib/pcm";
import { rng } from "./signal";

describe("PCM16 conversion", () => {
  it("clips instead of wrapping, and maps NaN to silence", () => {
    const out = floatToPcm16(new Float32Array([1.5, -1.5, 1, -1, 0.5, -0.5, 0, NaN, 1e-6]));
    expect([...out]).toEqual([32767, -32768, 32767, -32768, 16384, -16384, 0, 0, 0]);
  });

  it("int16 → float → int16 is exact for every value", () => {
    const all = new Int16Array(65536);
    for (let i = 0; i < all.length; i++) all[i] = i - 32768;
    const back = floatToPcm16(pcm16ToFloat(all));
    expect(back).toEqual(all);
  });

  it("floats stay within [-1, 1)", () => {
    const f = pcm16ToFloat(new Int16Array([-32768, 32767, 0]));
    expect(f[0]).toBe(-1);
    expect(f[1]).toBeLessThan(1);
    expect(f[2]).toBe(0);
  });
});

describe("base64", () => {
  it("matches btoa/atob for every tail length", () => {
    const random = rng(7);
    for (let n = 0; n < 40; n++) {
      const bytes = new Uint8Array(n).map(() => Math.floor(random() * 256));
      const expected = btoa(String.fromCharCode(...bytes));
      expect(bytesToBase64(bytes)).toBe(expected);
      expect(base64ToBytes(expected)).toEqual(bytes);
    }
  });

  it("handles large buffers (a 1 s delta)", () => {
    const bytes = new Uint8Array(48000).map((_, i) => (i * 31) & 255);
    expect(base64ToBytes(bytesToBase64(bytes))).toEqual(bytes);
  });

  it("rejects what is not strict base64", () => {
    expect(() => base64ToBytes("abc")).toThrow();
    expect(() => base64ToBytes("ab$=")).toThrow();
    expect(() => base64ToBytes("a===")).toThrow();
  });

  it("PCM16 travels little-endian", () => {
    expect(pcm16ToBase64(new Int16Array([1, -2]))).toBe(btoa(String.fromCharCode(1, 0, 254, 255)));
    expect([...base64ToPcm16(btoa(String.fromCharCode(1, 0, 254, 255)))]).toEqual([1, -2]);
  });

  it("round-trips PCM16, and refuses half samples", () => {
    const x = new Int16Array([0, 1, -1, 32767, -32768, 12345]);
    expect(base64ToPcm16(pcm16ToBase64(x))).toEqual(x);
    expect(() => base64ToPcm16(btoa("abc"))).toThrow(/whole number/);
  });

  it("encodes a view without touching the rest of its buffer", () => {
    const backing = new Int16Array([9, 1, 2, 9]);
    expect(base64ToPcm16(pcm16ToBase64(backing.subarray(1, 3)))).toEqual(new Int16Array([1, 2]));
  });
});
