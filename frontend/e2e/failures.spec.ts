/**
 * The screens a person meets when something is wrong: distinct, named, and with a way on.
 */
import { createServer } from "node:net";
import { expect, listInConfig, test } from "./fixtures";

/** A loopback port with nothing listening on it. */
async function closedPort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as { port: number };
  await new Promise((resolve) => server.close(resolve));
  return port;
}

test("a refused microphone gets its own screen, and typing instead still gets spoken replies", async ({ page, pageUrl }) => {
  await page.addInitScript(() => {
    navigator.mediaDevices.getUserMedia = () => Promise.reject(new DOMException("Permission denied", "NotAllowedError"));
  });
  await page.goto(pageUrl);
  await page.getByRole("button", { name: "Start conversation" }).click();
  const alert = page.getByRole("alert");
  await expect(alert).toHaveAttribute("data-failure", "mic-denied");
  await expect(alert.getByRole("heading", { name: "Microphone blocked" })).toBeFocused();
  await alert.getByRole("button", { name: "Type instead" }).click();
  await expect(page.getByTestId("status")).toHaveAttribute("data-phase", "listening");
  await page.getByLabel("Type a message").fill("Can you hear me without a microphone?");
  await page.getByLabel("Type a message").press("Enter");
  await expect(page.getByTestId("status")).toHaveAttribute("data-phase", "speaking", { timeout: 30_000 });
});

test("a wrong token is named as such, without endless retries", async ({ page, endpoint }) => {
  test.skip(endpoint !== undefined, "only the page's own server can tell a refused token from a dead one");
  await page.goto(`/?token=wrong&voiceProcessing=off`);
  await page.getByRole("button", { name: "Start conversation" }).click();
  const alert = page.getByRole("alert");
  await expect(alert).toHaveAttribute("data-failure", "auth");
  await expect(alert.getByRole("heading", { name: "Access denied" })).toBeVisible();
  await alert.getByRole("button", { name: "Connection settings" }).click();
  await expect(page.getByRole("dialog", { name: "Connection settings" })).toBeVisible();
  await page.getByLabel("Access token").fill("still-wrong");
  await page.keyboard.press("Escape");
  await expect(page.getByRole("dialog")).toBeHidden();
});

test("an unreachable server is retried a bounded number of times, then shown as down", async ({ page, token, endpoint }) => {
  test.skip(endpoint !== undefined, "the same in every project: it never reaches the project's endpoint");
  const port = await closedPort();
  await listInConfig(page, [`ws://127.0.0.1:${port}/`]); // the page connects only where its config allows
  await page.goto(`/?${new URLSearchParams({ endpoint: `ws://127.0.0.1:${port}/`, token, voiceProcessing: "off" })}`);
  await page.getByRole("button", { name: "Start conversation" }).click();
  const status = page.getByTestId("status");
  await expect(status).toHaveAttribute("data-phase", "reconnecting");
  await expect(status).toContainText(/try \d of 5/);
  // 0.5 + 1 + 2 + 4 + 8 s of backoff (±25%), then the screen.
  const alert = page.getByRole("alert");
  await expect(alert).toHaveAttribute("data-failure", "server-down", { timeout: 30_000 });
  await expect(alert.getByRole("heading", { name: "Can't reach the server" })).toBeVisible();
  await expect(alert).toContainText(`ws://127.0.0.1:${port}/`);
  // Back to the start; the big button works again.
  await alert.getByRole("button", { name: "Close" }).click();
  await expect(page.getByRole("button", { name: "Start conversation" })).toBeEnabled();
});

test("the controls work from the keyboard", async ({ page, pageUrl }) => {
  await page.goto(pageUrl);
  await expect(page.getByRole("button", { name: "Start conversation" })).toBeEnabled(); // once config.json is read
  await page.keyboard.press("Tab"); // Settings
  await page.keyboard.press("Tab"); // the big button
  await expect(page.getByRole("button", { name: "Start conversation" })).toBeFocused();
  await page.keyboard.press("Enter");
  await expect(page.getByTestId("status")).toHaveAttribute("data-phase", "listening", { timeout: 15_000 });
  await page.keyboard.press("Tab");
  await expect(page.getByLabel("Type a message")).toBeFocused();
  await page.keyboard.press("Shift+Tab");
  await expect(page.getByRole("button", { name: "End conversation" })).toBeFocused();
  await page.keyboard.press("Space");
  await expect(page.getByTestId("status")).toHaveAttribute("data-phase", "idle");
});
