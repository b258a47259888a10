/**
 * Browser tests: Debian's Chromium (/usr/bin/chromium; never `playwright install`) with a fake
 * microphone, against the real app started by e2e/global-setup.ts (`serve run` on a free loopback port).
 *
 * Projects pick the realtime endpoint through the `endpoint`/`token` options (e2e/fixtures.ts):
 * "direct" leaves it unset, so the page talks to the Serve app's own /v1/realtime; "gateway" runs the
 * conversation spec through the API Gateway emulator (devtools.local_gateway, started by e2e/app.ts);
 * "sign-in" signs in with the Cognito stand-in (devtools.local_oidc) and talks through the gateway.
 */
import { defineConfig } from "@playwright/test";
import { APP_TOKEN, ports, serveUrl } from "./e2e/app";
import type { TestOptions, WorkerOptions } from "./e2e/fixtures";

export default defineConfig<TestOptions, WorkerOptions>({
  testDir: "./e2e",
  outputDir: "./test-results",
  globalSetup: "./e2e/global-setup.ts",
  timeout: 120_000,
  expect: { timeout: 15_000 },
  workers: 1, // one app, a 2-core machine: the tests take turns
  fullyParallel: false,
  forbidOnly: !!process.env.CI,
  retries: 0,
  reporter: [["list"]],
  use: {
    baseURL: serveUrl,
    browserName: "chromium",
    headless: true,
    launchOptions: {
      executablePath: process.env.CHROMIUM_PATH ?? "/usr/bin/chromium",
      args: [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        "--autoplay-policy=no-user-gesture-required",
        // --use-file-for-fake-audio-capture=<the test's WAV> is added per worker (e2e/fixtures.ts).
      ],
    },
    viewport: { width: 1100, height: 900 },
    // Fewer animation frames: Chromium renders in software here, on the cores the app runs on.
    reducedMotion: "reduce",
    screenshot: "only-on-failure",
    trace: "retain-on-failure",
  },
  projects: [
    { name: "direct", testIgnore: /sign-in\.spec\.ts/ },
    // The same conversation through the AWS path: API Gateway emulator → Lambda handlers → Serve → @connections.
    {
      name: "gateway",
      testMatch: /conversation\.spec\.ts/,
      use: { endpoint: `ws://127.0.0.1:${ports.gateway}/`, token: APP_TOKEN },
    },
    // Its config.json (served by the spec) names the gateway and the user pool; no shared token.
    { name: "sign-in", testMatch: /sign-in\.spec\.ts/ },
  ],
});
