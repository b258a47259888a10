/**
 * Sign-in with a user pool (issue 21): the page's config.json has `auth`, pointing at the Cognito stand-in
 * (devtools.local_oidc, started by e2e/app.ts), and its endpoint is the API Gateway emulator, whose Lambda
 * authorizer accepts the stand-in's JWTs. The person signs in on the stand-in's form, talks with the access
 * token, the page refreshes it on its own (the stand-in's tokens last 20 s), and after signing out the
 * gateway lets the page in no more.
 */
import { request } from "node:http";
import { randomBytes } from "node:crypto";
import { OIDC, ports, serveUrl } from "./app";
import { csmState, expect, test } from "./fixtures";
import { newReplyItem, replyPlayedOut, transcriptTurn, userTurns } from "./helpers";

// Words pocketsphinx's bundled model hears in espeak-ng's voice (as in conversation.spec.ts).
const SPOKEN = "What is the weather like today? One two three four five.";
test.use({ micScript: { parts: [{ silence: 1.5 }, { say: SPOKEN }, { silence: 1 }] } });

const GATEWAY = `ws://127.0.0.1:${ports.gateway}/`;

interface OidcStats {
  logins: number;
  grants: { authorization_code: number; refresh_token: number };
  revocations: number;
  logouts: number;
  access_tokens: { jti: string; grant: string; username: string }[];
}

async function oidcStats(): Promise<OidcStats> {
  return (await fetch(`${OIDC.url}/_stats`)).json() as Promise<OidcStats>;
}

function claims(jwt: string): Record<string, unknown> {
  return JSON.parse(Buffer.from(jwt.split(".")[1], "base64url").toString("utf8"));
}

/** The token a socket URL presented (`?token=`), or null. */
const tokenOf = (url: string) => new URL(url).searchParams.get("token");

/** The HTTP status the gateway answers a WebSocket handshake with (101 when it lets the socket in). */
function handshakeStatus(url: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const req = request(url.replace(/^ws/, "http"), {
      headers: {
        Connection: "Upgrade",
        Upgrade: "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": randomBytes(16).toString("base64"),
      },
    });
    req.on("upgrade", (res, socket) => {
      socket.destroy();
      resolve(res.statusCode ?? 0);
    });
    req.on("response", (res) => {
      res.resume();
      resolve(res.statusCode ?? 0);
    });
    req.on("error", reject);
    req.end();
  });
}

test("signs in with the user pool, talks through the gateway with its token, refreshes it, and signs out", async ({ page }) => {
  await page.route("**/config.json", (route) =>
    route.fulfill({ json: { endpoint: GATEWAY, auth: { domain: OIDC.url, clientId: OIDC.clientId, scopes: ["openid", "email", "profile"] } } }),
  );
  const sockets: string[] = [];
  page.on("websocket", (ws) => sockets.push(ws.url()));
  const before = await oidcStats();

  // Sign in on the stand-in's hosted UI; the page comes back to the address it left from.
  await page.goto("/?voiceProcessing=off");
  const control = page.getByTestId("sign-in");
  await expect(control).toHaveAttribute("data-status", "signed-out");
  await control.getByRole("button", { name: "Sign in" }).click();
  await expect(page).toHaveURL((url) => url.origin === OIDC.url && url.pathname === "/oauth2/authorize");
  await page.getByLabel("Username").fill(OIDC.user.name);
  await page.getByLabel("Password").fill(OIDC.user.password);
  await page.getByRole("button", { name: "Sign in" }).click();
  await expect(control).toHaveAttribute("data-status", "signed-in");
  await expect(control).toContainText(`Signed in as ${OIDC.user.name}`);
  expect(new URL(page.url()).search).toBe("?voiceProcessing=off"); // no code or state left in it
  const signedIn = await oidcStats();
  expect(signedIn.logins).toBe(before.logins + 1);
  expect(signedIn.grants.authorization_code).toBe(before.grants.authorization_code + 1);
  // Tokens are kept in memory only.
  const stored = await page.evaluate(() => JSON.stringify([{ ...localStorage }, { ...sessionStorage }]));
  for (const issued of signedIn.access_tokens) expect(stored).not.toContain(issued.jti);
  expect(stored).not.toMatch(/eyJ[\w-]+\.eyJ/); // nothing JWT-shaped

  // A conversation through the gateway, admitted on the access token: one spoken turn, transcribed and answered.
  const status = page.getByTestId("status");
  await page.getByRole("button", { name: "Start conversation" }).click();
  await expect(status).toHaveAttribute("data-phase", "listening");
  const firstToken = tokenOf(sockets.at(-1)!);
  expect(firstToken).not.toBeNull();
  expect(claims(firstToken!)).toMatchObject({ token_use: "access", client_id: OIDC.clientId, username: OIDC.user.name });
  const userTurn = userTurns(page).first();
  await expect(userTurn).toHaveAttribute("data-status", "done", { timeout: 30_000 });
  await expect(userTurn.locator(".turn-text")).toContainText("weather");
  const reply = await newReplyItem(page, []);
  const played = await replyPlayedOut(page, reply);
  expect(played.receivedByItem[reply]).toBeGreaterThanOrEqual(24_000); // at least 1 s of reply audio
  await expect(transcriptTurn(page, reply).locator(".turn-text")).toHaveText(/^You said: /);
  await page.getByRole("button", { name: "End conversation" }).click();
  await expect(status).toHaveAttribute("data-phase", "idle");

  // The page refreshes the token on its own before it expires (a refresh_token grant at the stand-in)...
  await expect
    .poll(async () => (await page.evaluate(() => window.__csm?.signIn?.refreshes ?? 0)) > 0 && (await oidcStats()).grants.refresh_token > before.grants.refresh_token, {
      timeout: OIDC.accessTokenSeconds * 1000,
      message: "the page refreshed its tokens",
    })
    .toBe(true);
  // ...and the next connection presents a refreshed token, which the gateway admits.
  await page.getByRole("button", { name: "Start conversation" }).click();
  await expect(status).toHaveAttribute("data-phase", "listening");
  const renewedToken = tokenOf(sockets.at(-1)!);
  expect(renewedToken).not.toBe(firstToken);
  const grants = Object.fromEntries((await oidcStats()).access_tokens.map((t) => [t.jti, t.grant]));
  expect(grants[claims(renewedToken!).jti as string]).toBe("refresh_token");
  await page.getByRole("button", { name: "End conversation" }).click();
  await expect(status).toHaveAttribute("data-phase", "idle");

  // Sign out: the refresh token revoked, the hosted UI's session ended, the page back without a token.
  await control.getByRole("button", { name: "Sign out" }).click();
  // The stand-in's /logout sends the browser back to the page's own URL, `${origin}/`.
  await page.waitForURL((url) => url.origin === new URL(serveUrl).origin && url.pathname === "/" && url.search === "");
  await expect(control).toHaveAttribute("data-status", "signed-out");
  const signedOut = await oidcStats();
  expect(signedOut.revocations).toBe(before.revocations + 1);
  expect(signedOut.logouts).toBe(before.logouts + 1);
  expect(signedOut.grants.authorization_code).toBe(signedIn.grants.authorization_code); // not signed in again

  // The next connection has no token: the gateway refuses it (401), and the page says to sign in.
  expect(await handshakeStatus(GATEWAY)).toBe(401);
  const socketsBefore = sockets.length;
  await page.getByRole("button", { name: "Start conversation" }).click();
  const failure = page.locator('[data-failure="auth"]');
  await expect(failure).toBeVisible();
  await expect(failure.getByRole("heading")).toHaveText("Sign in to talk");
  await expect(failure.getByRole("button", { name: "Sign in" })).toBeVisible();
  expect(sockets.length).toBe(socketsBefore + 1);
  expect(tokenOf(sockets.at(-1)!)).toBeNull();
  expect((await csmState(page)).phase).toBe("error");
});
