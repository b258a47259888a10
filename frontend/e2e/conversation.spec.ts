/**
 * A conversation with the real app, in Debian's Chromium with a fake microphone playing espeak-ng
 * speech. Replies are noise (random weights) of up to 6 s; the echo responder says back what ASR heard.
 */
import { csmState, expect, test } from "./fixtures";
import { newReplyItem, replyPlayedOut, startConversation, transcriptTurn, userTurns } from "./helpers";

// Words pocketsphinx's bundled model hears in espeak-ng's voice (most sentences come back garbled).
const SPOKEN = "What is the weather like today? One two three four five.";
const TYPED = "Please answer this typed message with your voice.";

// One WAV per browser (Chromium's fake microphone): 1.5 s of silence, the turn, then silence.
test.use({ micScript: { parts: [{ silence: 1.5 }, { say: SPOKEN }, { silence: 1 }] } });

test("reaches listening, transcribes a spoken turn, plays the reply, and answers a typed turn", async ({ page, pageUrl }, testInfo) => {
  const status = await startConversation(page, pageUrl);
  // What x-server.info says before the first turn: the voices, and loudly, the random weights.
  await expect(page.getByTestId("random-weights")).toBeVisible();
  await expect(page.getByLabel("Voice").locator("option")).toHaveText([/None.*default/, "narrator"]);
  const totalBefore = (await csmState(page)).totalPlayed;

  // The spoken turn: its words shown while the person speaks, transcribed, answered with audio.
  const userTurn = userTurns(page).first();
  await page.waitForFunction(
    () => Array.from(document.querySelectorAll('li[data-role="user"][data-status="pending"] .turn-text')).some((e) => /[a-z]{2,}/i.test(e.textContent ?? "")),
    undefined,
    { timeout: 30_000 },
  );
  await expect(userTurn).toHaveAttribute("data-status", "done", { timeout: 30_000 });
  await expect(userTurn.locator(".turn-text")).toContainText("weather");
  const firstReply = await newReplyItem(page, []);
  await expect(status).toHaveAttribute("data-phase", "speaking", { timeout: 30_000 });
  await expect(page.getByRole("button", { name: "End conversation" })).toBeVisible();
  const shot = testInfo.outputPath("mid-reply.png");
  await page.screenshot({ path: shot, fullPage: true });
  await testInfo.attach("mid-reply", { path: shot, contentType: "image/png" });
  const afterFirst = await replyPlayedOut(page, firstReply);
  const firstLength = afterFirst.receivedByItem[firstReply];
  expect(firstLength).toBeGreaterThanOrEqual(24_000); // at least 1 s of reply audio
  expect(afterFirst.totalPlayed - totalBefore).toBeGreaterThanOrEqual(firstLength);
  await expect(transcriptTurn(page, firstReply).locator(".turn-text")).toHaveText(/^You said: /);
  await expect(page.getByTestId("latency")).toHaveText(/Response time\s+\d+\.\d\d s/);
  expect(afterFirst.truncates).toEqual([]);

  // The voice picker: the next reply in the narrator's voice.
  await page.getByLabel("Voice").selectOption("narrator");
  await expect.poll(async () => (await csmState(page)).events.filter((e) => e === "session.updated").length).toBeGreaterThan(0);

  // A typed turn also gets a spoken reply.
  await page.getByLabel("Type a message").fill(TYPED);
  await page.getByLabel("Type a message").press("Enter");
  await expect(page.getByLabel("Type a message")).toHaveValue("");
  await expect(userTurns(page).last()).toContainText(TYPED);
  const typedReply = await newReplyItem(page, [firstReply]);
  const afterTyped = await replyPlayedOut(page, typedReply);
  const typedLength = afterTyped.receivedByItem[typedReply];
  expect(typedLength).toBeGreaterThanOrEqual(24_000);
  expect(afterTyped.totalPlayed - afterFirst.totalPlayed).toBeGreaterThanOrEqual(typedLength);
  await expect(transcriptTurn(page, typedReply).locator(".turn-text")).toContainText(
    "You said: Please answer this typed message with your voice",
  );
  expect(afterTyped.latencies).toHaveLength(2);

  await page.getByRole("button", { name: "End conversation" }).click();
  await expect(status).toHaveAttribute("data-phase", "idle");
});
