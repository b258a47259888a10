/**
 * Where the page sends its token (see src/lib/config.ts): a link may not choose the host. A decoy server on
 * another loopback port stands in for the attacker's; it records every TCP connection, HTTP request and
 * WebSocket handshake it gets, so "the page never connected there" is asserted on what it saw, not on
 * what the page says.
 */
import { createServer, type Server } from "node:http";
import type { Socket } from "node:net";
import type { Page } from "@playwright/test";
import { expect, listInConfig, test } from "./fixtures";
import { serveUrl } from "./app";

interface Decoy {
  url: string;
  connections: number;
  /** Request URLs, handshakes and plain requests alike (a handshake's carries `?token=`). */
  requests: string[];
}

let server: Server;
const sockets = new Set<Socket>();
const decoy: Decoy = { url: "", connections: 0, requests: [] };

test.beforeAll(async () => {
  server = createServer((req, res) => {
    decoy.requests.push(req.url ?? "");
    res.writeHead(404).end();
  });
  server.on("connection", (socket) => {
    decoy.connections += 1; // before any bytes: a TLS (wss://) attempt counts too
    sockets.add(socket);
    socket.on("close", () => sockets.delete(socket));
  });
  server.on("upgrade", (req, socket) => {
    decoy.requests.push(req.url ?? "");
    socket.destroy(); // no handshake: recording it is all the decoy is for
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as { port: number };
  decoy.url = `ws://127.0.0.1:${port}/v1/realtime`;
});

test.afterAll(async () => {
  sockets.forEach((s) => s.destroy());
  await new Promise((resolve) => server.close(resolve));
});

test.beforeEach(({ endpoint }) => {
  test.skip(endpoint !== undefined, "about the page's own origin against another one");
  decoy.connections = 0;
  decoy.requests = [];
});

/** The page's default: its own origin's socket. */
const OWN_ENDPOINT = `${serveUrl.replace(/^http/, "ws")}/v1/realtime`;

/** Save the token the way a person does: in the settings panel. */
async function saveToken(page: Page, token: string): Promise<void> {
  await page.goto("/?voiceProcessing=off");
  await page.getByRole("button", { name: "Settings" }).click();
  await page.getByLabel("Access token").fill(token);
  await page.getByRole("button", { name: "Save" }).click();
  await expect(page.getByRole("dialog")).toBeHidden();
}

async function startAndListen(page: Page): Promise<void> {
  await page.getByRole("button", { name: "Start conversation" }).click();
  await expect(page.getByTestId("status")).toHaveAttribute("data-phase", "listening");
}

test("a link to another origin never gets the saved token; the page's own server is used instead", async ({ page, token }) => {
  await saveToken(page, token);
  const foreign = [decoy.url, decoy.url.replace(/^ws:/, "wss:")]; // plaintext, and TLS to the same port
  for (const link of foreign) {
    await page.goto(`/?${new URLSearchParams({ endpoint: link, voiceProcessing: "off" })}`);
    await page.getByRole("button", { name: "Start conversation" }).click();
    const status = page.getByTestId("status");
    // Connected somewhere (or failed to): the decoy has seen any attempt by now.
    await expect(status).toHaveAttribute("data-phase", /listening|reconnecting|error/);
    expect(decoy, `what the decoy received after ${link}`).toMatchObject({ connections: 0, requests: [] });
    await expect(status).toHaveAttribute("data-phase", "listening"); // the default, with the saved token
    await expect(page.locator(".footer code")).toHaveText(OWN_ENDPOINT);
    await expect(page.locator(".footer .warning")).toContainText(`ignored an unusable endpoint (${link})`);
    await page.getByRole("button", { name: "End conversation" }).click();
    await expect(status).toHaveAttribute("data-phase", "idle");
    await page.getByRole("button", { name: "Settings" }).click();
    const alert = page.getByRole("dialog").getByRole("alert");
    await expect(alert).toContainText("Ignored the endpoint from the page address");
    await expect(alert).toContainText("neither this page's server nor listed in config.json");
  }
  expect(decoy).toMatchObject({ connections: 0, requests: [] });
});

test("an endpoint config.json lists is used, with the token (the decoy does see a connection it is allowed)", async ({ page, token }) => {
  // The control for the test above: had the page connected to the decoy, the decoy would have seen it.
  await saveToken(page, token);
  await listInConfig(page, [decoy.url]);
  await page.goto(`/?${new URLSearchParams({ endpoint: decoy.url, voiceProcessing: "off" })}`);
  await expect(page.locator(".footer code")).toHaveText(decoy.url);
  await page.getByRole("button", { name: "Start conversation" }).click();
  await expect.poll(() => decoy.requests.length, { message: "the decoy gets a handshake" }).toBeGreaterThan(0);
  expect(new URL(decoy.requests[0], decoy.url).searchParams.get("token")).toBe(token);
});

test("a token in the fragment is used, saved, and taken out of the address bar", async ({ page, token }) => {
  await page.goto(`/?voiceProcessing=off#${new URLSearchParams({ token })}`);
  await expect.poll(() => page.url()).not.toContain("token");
  expect(page.url()).toContain("voiceProcessing=off");
  await startAndListen(page);
  const saved = await page.evaluate(() => window.localStorage.getItem("csm.settings"));
  expect(JSON.parse(saved ?? "{}")).toMatchObject({ token });
  await page.getByRole("button", { name: "End conversation" }).click();
  // Reloaded without it, the page still has the token, now from this browser's settings.
  await page.reload();
  await page.getByRole("button", { name: "Settings" }).click();
  await expect(page.getByRole("dialog")).toContainText("with a token (saved in this browser)");
});

test("a token in the query (older links) still works, and leaves the address bar at once", async ({ page, token }) => {
  await page.goto(`/?${new URLSearchParams({ token, voiceProcessing: "off" })}`);
  await expect.poll(() => page.url()).not.toContain("token");
  await startAndListen(page);
});
