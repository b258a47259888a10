/**
 * Barge-in with the real app: the fake microphone says one thing, then, while the reply plays, another.
 * The page must flush playback and tell the server, with `conversation.item.truncate`, what was heard.
 */
import { csmState, expect, test } from "./fixtures";
import { newReplyItem, startConversation, transcriptTurn, userTurns } from "./helpers";

// The first turn: pocketsphinx hears ~60 characters in it, so the echo reply lasts the full 6 s cap.
// The second starts 5.5 s after the first ends: the reply starts 0.5 s (the VAD's silence) + ASR + the
// first frame after the end of the turn (~1.3 s on an idle machine), so the second turn lands in it
// whenever that takes between ~0.2 s and ~5.5 s.
test.use({
  micScript: {
    parts: [
      { silence: 1.5 },
      { say: "I am testing the voice page today, and I would like to hear your answer about the sea." },
      { silence: 5.5 },
      { say: "Wait, stop, please listen to me." },
      { silence: 1 },
    ],
  },
});

test("speaking during a reply flushes its playback and truncates it on the server", async ({ page, pageUrl }) => {
  const status = await startConversation(page, pageUrl);
  const reply = await newReplyItem(page, []);
  await expect(status).toHaveAttribute("data-phase", "speaking", { timeout: 30_000 });

  // The second utterance: the server hears speech, the page flushes and sends a truncate.
  await expect.poll(async () => (await csmState(page)).truncates.length, { timeout: 30_000 }).toBeGreaterThan(0);
  const s = await csmState(page);
  const [truncate] = s.truncates;
  expect(truncate).toMatchObject({ itemId: reply, reason: "barge-in" });
  const flush = s.flushes.find((f) => f.reason === "barge-in");
  expect(flush?.played[reply]).toBeDefined();
  const played = flush!.played[reply];
  expect(truncate.audioEndMs).toBe(Math.floor((played * 1000) / 24_000));
  expect(truncate.audioEndMs).toBeGreaterThan(0);
  // Cut short: less was heard than had arrived.
  expect(played).toBeLessThan(s.receivedByItem[reply]);

  // The server got it: it answers with conversation.item.truncated for the same item and time.
  await expect.poll(async () => (await csmState(page)).truncated).toContainEqual({ itemId: reply, audioEndMs: truncate.audioEndMs });
  await expect(transcriptTurn(page, reply)).toHaveAttribute("data-status", "interrupted");

  // Flushed: nothing more of that reply plays.
  await page.waitForTimeout(1000);
  const later = await csmState(page);
  expect(later.playedByItem[reply]).toBe(played);

  // And the conversation goes on: the interrupting turn is transcribed.
  await expect(userTurns(page).nth(1)).toHaveAttribute("data-status", "done", { timeout: 30_000 });
});
