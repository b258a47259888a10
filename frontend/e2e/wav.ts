/**
 * Test audio: espeak-ng speech with silence we add ourselves, written as 16-bit PCM WAV (what
 * Chromium's --use-file-for-fake-audio-capture plays as the microphone, and what a voice file is).
 */
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

export interface Pcm {
  rate: number;
  samples: Int16Array;
}

/** What the fake microphone plays: utterances and silences (seconds), in order. */
export interface MicScript {
  parts: ({ say: string } | { silence: number })[];
}

export function readWav(bytes: Buffer): Pcm {
  if (bytes.toString("ascii", 0, 4) !== "RIFF" || bytes.toString("ascii", 8, 12) !== "WAVE") throw new Error("not a WAV file");
  let rate = 0;
  let at = 12;
  while (at + 8 <= bytes.length) {
    const id = bytes.toString("ascii", at, at + 4);
    let size = bytes.readUInt32LE(at + 4);
    const body = at + 8;
    if (id === "fmt ") {
      const format = bytes.readUInt16LE(body);
      const channels = bytes.readUInt16LE(body + 2);
      rate = bytes.readUInt32LE(body + 4);
      const bits = bytes.readUInt16LE(body + 14);
      if (format !== 1 || channels !== 1 || bits !== 16) throw new Error(`expected 16-bit mono PCM, got format ${format}, ${channels} ch, ${bits} bit`);
    } else if (id === "data") {
      if (size === 0 || body + size > bytes.length) size = bytes.length - body; // a streamed header
      const data = bytes.subarray(body, body + size - (size % 2));
      const samples = new Int16Array(data.length / 2);
      for (let i = 0; i < samples.length; i++) samples[i] = data.readInt16LE(i * 2);
      if (!rate) throw new Error("WAV data before its fmt chunk");
      return { rate, samples };
    }
    at = body + size + (size % 2);
  }
  throw new Error("WAV file without data");
}

export function writeWav(path: string, { rate, samples }: Pcm): void {
  const header = Buffer.alloc(44);
  header.write("RIFF", 0, "ascii");
  header.writeUInt32LE(36 + samples.length * 2, 4);
  header.write("WAVE", 8, "ascii");
  header.write("fmt ", 12, "ascii");
  header.writeUInt32LE(16, 16);
  header.writeUInt16LE(1, 20); // PCM
  header.writeUInt16LE(1, 22); // mono
  header.writeUInt32LE(rate, 24);
  header.writeUInt32LE(rate * 2, 28);
  header.writeUInt16LE(2, 32);
  header.writeUInt16LE(16, 34);
  header.write("data", 36, "ascii");
  header.writeUInt32LE(samples.length * 2, 40);
  const data = Buffer.alloc(samples.length * 2);
  samples.forEach((s, i) => data.writeInt16LE(s, i * 2));
  writeFileSync(path, Buffer.concat([header, data]));
}

/** espeak-ng saying `text` (US English, 160 words a minute): its own 22050 Hz 16-bit output. */
export function espeak(text: string): Pcm {
  const dir = mkdtempSync(join(tmpdir(), "csm-espeak-"));
  try {
    const file = join(dir, "say.wav");
    execFileSync("espeak-ng", ["-v", "en-us", "-s", "160", "-w", file, text]);
    return readWav(readFileSync(file));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/** The script rendered to one WAV file; returns where each utterance starts and ends (seconds). */
export function writeMicWav(path: string, script: MicScript): { start: number; end: number; text: string }[] {
  const parts: Int16Array[] = [];
  const spans: { start: number; end: number; text: string }[] = [];
  let rate = 22050;
  let length = 0;
  const spoken = script.parts.map((part) => ("say" in part ? espeak(part.say) : null));
  rate = spoken.find((p) => p !== null)?.rate ?? rate;
  script.parts.forEach((part, k) => {
    const speech = spoken[k];
    const samples = speech !== null ? speech.samples : new Int16Array(Math.round(("silence" in part ? part.silence : 0) * rate));
    if (speech !== null && speech.rate !== rate) throw new Error("espeak-ng changed its sample rate");
    if ("say" in part) spans.push({ start: length / rate, end: (length + samples.length) / rate, text: part.say });
    parts.push(samples);
    length += samples.length;
  });
  const all = new Int16Array(length);
  let at = 0;
  for (const p of parts) {
    all.set(p, at);
    at += p.length;
  }
  writeWav(path, { rate, samples: all });
  return spans;
}
