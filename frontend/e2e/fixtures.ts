/**
 * Test options and fixtures shared by the browser tests.
 *
 * - `endpoint` / `token` (options, per project): which realtime endpoint the page uses. Without an
 *   endpoint the page talks to its own origin's `/v1/realtime` (the Serve app); a project may set
 *   `endpoint: "ws://127.0.0.1:PORT/"` (the API Gateway emulator) and the page gets `?endpoint=`.
 * - `micScript` (worker option): what the fake microphone says. Chromium plays one WAV file per
 *   browser launch, so each script gets its own worker and browser.
 * - `pageUrl`: the page's URL with the endpoint, the token and `voiceProcessing=off` (the fake device
 *   must reach the server unaltered). With an endpoint, the page's config.json lists it (`listInConfig`),
 *   as a deployment lists its API Gateway: the page connects to no other origin.
 * - `csm`: reads `window.__csm`, the page's test hook.
 */
import { test as base, type Page } from "@playwright/test";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { APP_TOKEN } from "./app";
import { type MicScript, writeMicWav } from "./wav";
import type {} from "../src/testHook"; // window.__csm

export interface TestOptions {
  endpoint: string | undefined;
  token: string;
}

export interface WorkerOptions {
  micScript: MicScript;
}

export interface CsmState {
  phase: string;
  totalPlayed: number;
  playedByItem: Record<string, number>;
  receivedByItem: Record<string, number>;
  truncates: { itemId: string; audioEndMs: number; reason: string }[];
  truncated: { itemId: string; audioEndMs: number }[];
  flushes: { reason: string; played: Record<string, number> }[];
  events: string[];
  sent: Record<string, number>;
  latencies: number[];
  player: { state: string; bufferedMs: number; prerollMs: number; underruns: number } | null;
  sampleRate: number | null;
}

export async function csmState(page: Page): Promise<CsmState> {
  return page.evaluate(() => {
    const h = window.__csm;
    if (!h) throw new Error("window.__csm is missing");
    return {
      phase: h.phase,
      totalPlayed: h.totalPlayed,
      playedByItem: h.playedByItem,
      receivedByItem: h.receivedByItem,
      truncates: h.truncates,
      truncated: h.truncated,
      flushes: h.flushes,
      events: h.events,
      sent: h.sent,
      latencies: [...h.latencies],
      player: h.player,
      sampleRate: h.sampleRate,
    };
  });
}

/** Serve this page a config.json that lists `endpoints` (the page refuses other origins it is not given there). */
export async function listInConfig(page: Page, endpoints: string[]): Promise<void> {
  await page.route("**/config.json", (route) => route.fulfill({ json: { endpoints } }));
}

export const test = base.extend<TestOptions & { pageUrl: string; timeline: void }, WorkerOptions & { micWav: string }>({
  endpoint: [undefined, { option: true }],
  token: [APP_TOKEN, { option: true }],
  micScript: [{ parts: [{ silence: 1 }] }, { option: true, scope: "worker" }],
  micWav: [
    async ({ micScript }, use) => {
      const dir = mkdtempSync(join(tmpdir(), "csm-mic-"));
      const file = join(dir, "mic.wav");
      writeMicWav(file, micScript);
      await use(file);
      rmSync(dir, { recursive: true, force: true });
    },
    { scope: "worker" },
  ],
  launchOptions: [
    async ({ launchOptions, micWav }, use) => {
      // %noloop: the file plays once from getUserMedia on, then silence.
      await use({ ...launchOptions, args: [...(launchOptions.args ?? []), `--use-file-for-fake-audio-capture=${micWav}%noloop`] });
    },
    { scope: "worker" },
  ],
  // After each test, what the page heard and when (server events, player reports): for diagnosis.
  timeline: [
    async ({ page }, use, testInfo) => {
      await use();
      const timeline = await page.evaluate(() => window.__csm?.timeline ?? []).catch(() => []);
      if (timeline.length) {
        const file = testInfo.outputPath("timeline.json");
        writeFileSync(file, JSON.stringify(timeline));
        await testInfo.attach("timeline", { path: file, contentType: "application/json" });
      }
    },
    { auto: true },
  ],
  pageUrl: async ({ page, endpoint, token }, use) => {
    const query = new URLSearchParams({ token, voiceProcessing: "off" });
    if (endpoint) {
      query.set("endpoint", endpoint);
      await listInConfig(page, [endpoint]);
    }
    await use(`/?${query}`);
  },
});

export { expect } from "@playwright/test";
