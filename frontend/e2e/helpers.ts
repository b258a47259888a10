import type { Page } from "@playwright/test";
import { csmState, expect } from "./fixtures";

/** Open the page, press the big button, and wait for "listening". Returns the status element. */
export async function startConversation(page: Page, pageUrl: string) {
  await page.goto(pageUrl);
  const status = page.getByTestId("status");
  await expect(status).toHaveAttribute("data-phase", "idle");
  await page.getByRole("button", { name: "Start conversation" }).click();
  await expect(status).toHaveAttribute("data-phase", "listening");
  return status;
}

/** The id of the first reply item whose audio arrives and is not in `known`. */
export async function newReplyItem(page: Page, known: string[]): Promise<string> {
  let itemId = "";
  await expect
    .poll(
      async () => {
        const ids = Object.keys((await csmState(page)).receivedByItem).filter((id) => !known.includes(id));
        itemId = ids[0] ?? "";
        return itemId;
      },
      { timeout: 30_000, message: "reply audio arrives" },
    )
    .not.toBe("");
  return itemId;
}

/** Wait until the reply `itemId` has played to its end and the page listens again; the state then. */
export async function replyPlayedOut(page: Page, itemId: string) {
  await expect
    .poll(
      async () => {
        const s = await csmState(page);
        const received = s.receivedByItem[itemId] ?? 0;
        return s.phase === "listening" && received > 0 && s.playedByItem[itemId] === received;
      },
      { timeout: 30_000, message: `reply ${itemId} played to its end` },
    )
    .toBe(true);
  return csmState(page);
}

export const transcriptTurn = (page: Page, itemId: string) => page.getByTestId("transcript").locator(`li[data-item-id="${itemId}"]`);
export const userTurns = (page: Page) => page.getByTestId("transcript").locator('li[data-role="user"]');
