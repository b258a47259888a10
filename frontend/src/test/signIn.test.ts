import { beforeEach, describe, expect, it } from "vitest";
import {
  type AuthConfig,
  base64url,
  codeChallenge,
  describeOAuthError,
  PENDING_KEY,
  refreshDelayMs,
  SignIn,
  type SignInCallback,
  takeCallback,
} from "../lib/signIn";
import { Clock, settle } from "./fakes";

const AUTH: AuthConfig = { domain: "https://csm.auth.eu-west-1.amazoncognito.com", clientId: "client-1", scopes: ["openid", "email", "profile"] };
const PAGE = "https://csm.example/";
const T0 = 1_800_000_000_000; // wall-clock ms

/** sessionStorage that remembers every value ever written to it. */
class RecordingStorage {
  readonly items = new Map<string, string>();
  readonly written: string[] = [];
  getItem = (k: string) => this.items.get(k) ?? null;
  setItem = (k: string, v: string) => {
    this.written.push(v);
    this.items.set(k, v);
  };
  removeItem = (k: string) => void this.items.delete(k);
}

/** A JWT-shaped token (unsigned: the page never verifies them, the server does). */
function jwt(claims: Record<string, unknown>): string {
  const part = (v: unknown) => base64url(new TextEncoder().encode(JSON.stringify(v)));
  return `${part({ alg: "RS256", kid: "k" })}.${part(claims)}.c2ln`;
}

interface Call {
  url: string;
  form: Record<string, string>;
}

/** The token and revoke endpoints, answering from a queue the test fills. */
class FakeCognito {
  calls: Call[] = [];
  answers: (Response | Error)[] = [];
  issued = 0;
  fetch = (async (input: string | URL | Request, init?: RequestInit) => {
    const form = Object.fromEntries(new URLSearchParams(String(init?.body ?? "")));
    this.calls.push({ url: String(input), form });
    expect(init?.method).toBe("POST");
    expect(new Headers(init?.headers).get("Content-Type")).toBe("application/x-www-form-urlencoded");
    const next = this.answers.shift();
    if (next === undefined) throw new Error(`no answer queued for ${String(input)}`);
    if (next instanceof Error) throw next;
    return next;
  }) as typeof fetch;
  /** A token response as Cognito gives it (a refresh grant gets no new refresh token). */
  tokens(lifetimeS: number, withRefresh = true): Response {
    const n = ++this.issued;
    const body: Record<string, unknown> = {
      access_token: jwt({ token_use: "access", username: "alice", jti: `a${n}` }),
      id_token: jwt({ token_use: "id", "cognito:username": "alice", email: "alice@example.com" }),
      expires_in: lifetimeS,
      token_type: "Bearer",
    };
    if (withRefresh) body.refresh_token = `refresh-${n}`;
    return Response.json(body);
  }
  error(status: number, error: string, description?: string): Response {
    return Response.json({ error, ...(description ? { error_description: description } : {}) }, { status });
  }
}

let clock: Clock;
let storage: RecordingStorage;
let cognito: FakeCognito;
let visited: string[];
let bytes: number;

function makeSignIn(): SignIn {
  return new SignIn({
    config: AUTH,
    redirectUri: PAGE,
    storage,
    fetch: cognito.fetch,
    navigate: (url) => visited.push(url),
    timers: clock,
    now: () => T0 + clock.now,
    // Deterministic "random" bytes, different each call.
    randomBytes: (n) => Uint8Array.from({ length: n }, (_, i) => (i * 7 + ++bytes) & 0xff),
  });
}

/** Begin a sign-in, come back from the hosted UI with `code` (and the state it was given, unless `state`). */
async function signInFlow(signIn: SignIn, opts: { code?: string; state?: string; returnTo?: string } = {}): Promise<SignInCallback> {
  await signIn.begin(opts.returnTo ?? "/?voiceProcessing=off");
  const authorize = new URL(visited[visited.length - 1]);
  const back = new URL(PAGE);
  back.searchParams.set("code", opts.code ?? "code-1");
  back.searchParams.set("state", opts.state ?? authorize.searchParams.get("state")!);
  const taken = takeCallback(back.toString(), storage);
  expect(taken).not.toBeNull();
  return taken!.callback;
}

beforeEach(() => {
  clock = new Clock();
  storage = new RecordingStorage();
  cognito = new FakeCognito();
  visited = [];
  bytes = 0;
});

describe("PKCE", () => {
  it("computes RFC 7636's appendix B challenge", async () => {
    const octets = [116, 24, 223, 180, 151, 153, 224, 37, 79, 250, 96, 125, 216, 173, 187, 186, 22, 212, 37, 77, 105, 214, 191, 240, 91, 88, 5, 88, 83, 132, 141, 121];
    const verifier = base64url(Uint8Array.from(octets));
    expect(verifier).toBe("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk");
    expect(await codeChallenge(verifier)).toBe("E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM");
  });

  it("sends the browser to the hosted UI with a fresh verifier's S256 challenge and a random state", async () => {
    const signIn = makeSignIn();
    await signIn.begin("/?voiceProcessing=off");
    const url = new URL(visited[0]);
    expect(`${url.origin}${url.pathname}`).toBe(`${AUTH.domain}/oauth2/authorize`);
    const q = Object.fromEntries(url.searchParams);
    const pending = JSON.parse(storage.getItem(PENDING_KEY)!);
    expect(q).toEqual({
      response_type: "code",
      client_id: "client-1",
      redirect_uri: PAGE,
      scope: "openid email profile",
      state: pending.state,
      code_challenge: await codeChallenge(pending.verifier),
      code_challenge_method: "S256",
    });
    expect(pending.verifier).toMatch(/^[A-Za-z0-9_-]{43}$/);
    expect(pending.state).toMatch(/^[A-Za-z0-9_-]{22}$/);
    expect(pending.returnTo).toBe("/?voiceProcessing=off");
    expect(signIn.getSnapshot().status).toBe("signing-in");
    // A second sign-in gets new ones.
    await signIn.begin("/");
    const again = JSON.parse(storage.getItem(PENDING_KEY)!);
    expect(again.state).not.toBe(pending.state);
    expect(again.verifier).not.toBe(pending.verifier);
  });
});

describe("the redirect back", () => {
  it("takes code and state out of the address, and the pending sign-in out of storage", async () => {
    const signIn = makeSignIn();
    await signIn.begin("/?voiceProcessing=off#x");
    const { state, verifier } = JSON.parse(storage.getItem(PENDING_KEY)!);
    const taken = takeCallback(`${PAGE}?code=c1&state=${state}`, storage);
    expect(taken?.address).toBe("https://csm.example/?voiceProcessing=off#x");
    expect(taken?.callback).toEqual({ state, code: "c1", error: null, errorDescription: null, pending: { state, verifier, returnTo: "/?voiceProcessing=off#x" } });
    expect(storage.items.has(PENDING_KEY)).toBe(false);
  });

  it("leaves other addresses alone, and never goes back to another origin", async () => {
    expect(takeCallback(`${PAGE}?voiceProcessing=off`, storage)).toBeNull();
    expect(takeCallback(`${PAGE}?code=1`, storage)).toBeNull(); // no state: not a sign-in reply
    storage.setItem(PENDING_KEY, JSON.stringify({ state: "s", verifier: "v", returnTo: "//evil.example/" }));
    expect(takeCallback(`${PAGE}?code=c&state=s&keep=1`, storage)?.address).toBe("https://csm.example/?keep=1");
    // A state that is not the pending one: the address is only cleaned.
    storage.setItem(PENDING_KEY, JSON.stringify({ state: "s", verifier: "v", returnTo: "/?a=1" }));
    expect(takeCallback(`${PAGE}?error=access_denied&state=other`, storage)?.address).toBe(PAGE);
  });

  it("refuses a reply whose state does not match, without asking for tokens", async () => {
    const signIn = makeSignIn();
    const callback = await signInFlow(signIn, { state: "forged" });
    expect(await signIn.complete(callback)).toBe(false);
    expect(cognito.calls).toEqual([]);
    expect(signIn.getSnapshot()).toMatchObject({ status: "signed-out", accessToken: null });
    expect(signIn.getSnapshot().message).toMatch(/did not match a sign-in started on this page/);
    // Nor one this page never started (no pending record).
    const stray = takeCallback(`${PAGE}?code=c&state=s`, storage)!.callback;
    expect(stray.pending).toBeNull();
    expect(await makeSignIn().complete(stray)).toBe(false);
    expect(cognito.calls).toEqual([]);
  });

  it("exchanges the code with the verifier, and is signed in", async () => {
    const signIn = makeSignIn();
    const callback = await signInFlow(signIn, { code: "the-code" });
    cognito.answers.push(cognito.tokens(3600));
    expect(await signIn.complete(callback)).toBe(true);
    expect(cognito.calls).toEqual([
      {
        url: `${AUTH.domain}/oauth2/token`,
        form: { grant_type: "authorization_code", client_id: "client-1", code: "the-code", redirect_uri: PAGE, code_verifier: callback.pending!.verifier },
      },
    ]);
    const snap = signIn.getSnapshot();
    expect(snap).toMatchObject({ status: "signed-in", username: "alice", expiresAt: T0 + 3600_000, message: null, refreshes: 0 });
    expect(snap.accessToken).toContain(".");
  });
});

describe("errors, in words", () => {
  it("an OAuth error from the token endpoint", async () => {
    const signIn = makeSignIn();
    const callback = await signInFlow(signIn);
    cognito.answers.push(cognito.error(400, "invalid_grant", "Invalid authorization code"));
    expect(await signIn.complete(callback)).toBe(false);
    expect(signIn.getSnapshot()).toMatchObject({
      status: "signed-out",
      accessToken: null,
      message: "Sign-in failed: the sign-in is no longer valid (invalid_grant: Invalid authorization code).",
    });
  });

  it("an error the hosted UI redirected back with", async () => {
    const signIn = makeSignIn();
    await signIn.begin("/");
    const { state } = JSON.parse(storage.getItem(PENDING_KEY)!);
    const { callback } = takeCallback(`${PAGE}?error=access_denied&error_description=User+cancelled&state=${state}`, storage)!;
    expect(await signIn.complete(callback)).toBe(false);
    expect(cognito.calls).toEqual([]);
    expect(signIn.getSnapshot().message).toBe("Sign-in failed: access was denied (access_denied: User cancelled).");
  });

  it("an unreachable service, and an answer that is not OAuth's", async () => {
    const signIn = makeSignIn();
    cognito.answers.push(new TypeError("Failed to fetch"));
    await signIn.complete(await signInFlow(signIn));
    expect(signIn.getSnapshot().message).toBe(`Sign-in failed: could not reach the sign-in service at ${AUTH.domain}.`);
    cognito.answers.push(new Response("<html>Bad gateway</html>", { status: 502 }));
    await signIn.complete(await signInFlow(signIn));
    expect(signIn.getSnapshot().message).toBe("Sign-in failed: the sign-in service answered HTTP 502.");
    cognito.answers.push(Response.json({ token_type: "Bearer" }));
    await signIn.complete(await signInFlow(signIn));
    expect(signIn.getSnapshot().message).toBe("Sign-in failed: the sign-in service sent no access token.");
    expect(describeOAuthError("invalid_client")).toMatch(/auth\.clientId in config\.json/);
    expect(describeOAuthError("weird_thing", "odd")).toBe("the sign-in service answered weird_thing (weird_thing: odd)");
  });
});

describe("refreshing", () => {
  it("refreshes at 80% of the lifetime or a minute before expiry, whichever is sooner, but not before half", () => {
    expect(refreshDelayMs(3600_000)).toBe(2880_000); // 80%
    expect(refreshDelayMs(300_000)).toBe(240_000); // both
    expect(refreshDelayMs(150_000)).toBe(90_000); // a minute before
    expect(refreshDelayMs(20_000)).toBe(10_000); // half
  });

  it("renews the tokens before the access token expires, keeping the refresh token", async () => {
    const signIn = makeSignIn();
    cognito.answers.push(cognito.tokens(3600));
    await signIn.complete(await signInFlow(signIn));
    const first = signIn.getSnapshot().accessToken;
    let changes = 0;
    signIn.subscribe(() => changes++);

    cognito.answers.push(cognito.tokens(3600, false));
    clock.advance(2880_000 - 1);
    expect(cognito.calls).toHaveLength(1);
    clock.advance(1);
    await settle();
    expect(cognito.calls[1]).toEqual({
      url: `${AUTH.domain}/oauth2/token`,
      form: { grant_type: "refresh_token", client_id: "client-1", refresh_token: "refresh-1" },
    });
    const renewed = signIn.getSnapshot();
    expect(renewed).toMatchObject({ status: "signed-in", refreshes: 1, expiresAt: T0 + 2880_000 + 3600_000 });
    expect(renewed.accessToken).not.toBe(first);
    expect(changes).toBe(1);

    // The next refresh presents the same refresh token (the answer had none).
    cognito.answers.push(cognito.tokens(3600, false));
    clock.advance(2880_000);
    await settle();
    expect(cognito.calls[2].form.refresh_token).toBe("refresh-1");
    expect(signIn.getSnapshot().refreshes).toBe(2);
  });

  it("a refused refresh ends the sign-in and says so", async () => {
    const signIn = makeSignIn();
    cognito.answers.push(cognito.tokens(600));
    await signIn.complete(await signInFlow(signIn));
    cognito.answers.push(cognito.error(400, "invalid_grant", "Refresh Token has been revoked"));
    clock.advance(refreshDelayMs(600_000));
    await settle();
    expect(signIn.getSnapshot()).toMatchObject({ status: "expired", accessToken: null });
    expect(signIn.getSnapshot().message).toBe(
      "Your sign-in could not be renewed: the sign-in is no longer valid (invalid_grant: Refresh Token has been revoked). Sign in again.",
    );
    expect(clock.pending).toBe(0); // nothing more is tried
  });

  it("a refresh that does not reach the service is tried again while the access token lasts", async () => {
    const signIn = makeSignIn();
    cognito.answers.push(cognito.tokens(600));
    await signIn.complete(await signInFlow(signIn));
    const token = signIn.getSnapshot().accessToken;
    cognito.answers.push(new TypeError("Failed to fetch"), cognito.error(503, "temporarily_unavailable"), cognito.tokens(600, false));
    clock.advance(480_000);
    await settle();
    expect(signIn.getSnapshot()).toMatchObject({ status: "signed-in", accessToken: token }); // still good for 2 minutes
    clock.advance(15_000);
    await settle();
    expect(cognito.calls).toHaveLength(3);
    clock.advance(15_000);
    await settle();
    expect(cognito.calls).toHaveLength(4);
    expect(signIn.getSnapshot()).toMatchObject({ status: "signed-in", refreshes: 1 });
    expect(signIn.getSnapshot().accessToken).not.toBe(token);
  });

  it("gives up when the access token runs out before the service answers", async () => {
    const signIn = makeSignIn();
    cognito.answers.push(cognito.tokens(20));
    await signIn.complete(await signInFlow(signIn));
    for (let i = 0; i < 10; i++) cognito.answers.push(new TypeError("Failed to fetch"));
    for (let i = 0; i < 10 && signIn.getSnapshot().status === "signed-in"; i++) {
      clock.advance(10_000);
      await settle();
    }
    expect(signIn.getSnapshot().status).toBe("expired");
    expect(signIn.getSnapshot().message).toMatch(/could not be renewed: could not reach the sign-in service/);
    expect(clock.now).toBeLessThanOrEqual(20_000);
  });
});

describe("tokens stay in memory", () => {
  it("never writes a token to storage, and leaves nothing there once signed in", async () => {
    const signIn = makeSignIn();
    cognito.answers.push(cognito.tokens(600));
    await signIn.complete(await signInFlow(signIn));
    cognito.answers.push(cognito.tokens(600));
    clock.advance(refreshDelayMs(600_000));
    await settle();
    expect(signIn.getSnapshot().refreshes).toBe(1);
    const secrets = [signIn.getSnapshot().accessToken!, "refresh-1", "refresh-2", "a1", "a2"];
    for (const value of storage.written) for (const secret of secrets) expect(value).not.toContain(secret);
    expect(storage.written).toHaveLength(1); // the pending sign-in (state, verifier, returnTo), once
    expect([...storage.items.keys()]).toEqual([]);
  });

  it("signing out revokes the refresh token, forgets the tokens and ends the hosted UI's session", async () => {
    const signIn = makeSignIn();
    cognito.answers.push(cognito.tokens(600));
    await signIn.complete(await signInFlow(signIn));
    cognito.answers.push(new Response(null, { status: 200 }));
    await signIn.signOut();
    expect(cognito.calls[1]).toEqual({ url: `${AUTH.domain}/oauth2/revoke`, form: { token: "refresh-1", client_id: "client-1" } });
    expect(signIn.getSnapshot()).toMatchObject({ status: "signed-out", accessToken: null, username: null });
    const logout = new URL(visited[visited.length - 1]);
    expect(`${logout.origin}${logout.pathname}`).toBe(`${AUTH.domain}/logout`);
    expect(Object.fromEntries(logout.searchParams)).toEqual({ client_id: "client-1", logout_uri: PAGE });
    clock.advance(3600_000);
    await settle();
    expect(cognito.calls).toHaveLength(2); // no refresh after signing out
  });

  it("signs out even when the revocation cannot be sent", async () => {
    const signIn = makeSignIn();
    cognito.answers.push(cognito.tokens(600));
    await signIn.complete(await signInFlow(signIn));
    cognito.answers.push(new TypeError("Failed to fetch"));
    await signIn.signOut();
    expect(signIn.getSnapshot().accessToken).toBeNull();
    expect(new URL(visited[visited.length - 1]).pathname).toBe("/logout");
  });
});
