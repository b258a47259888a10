/**
 * Signing in with a Cognito user pool's hosted UI, from a page with no server of its own: OAuth 2.0
 * authorization code with PKCE (RFC 7636, S256).
 *
 * config.json's `auth` (`{domain, clientId, scopes}`) turns it on; the app client must list the page's own
 * URL, `${origin}/`, as its callback and sign-out URL.
 * - `begin` makes a random code verifier and state, keeps them (and the address to come back to) in
 *   sessionStorage — the one thing that must survive the redirect — and goes to `${domain}/oauth2/authorize`.
 * - Cognito sends the browser back to `${origin}/?code=...&state=...`. `takeCallback`, before the page
 *   renders, takes those out of the address (the page puts back the address it left from) and the pending
 *   record out of storage; `complete` checks the state and exchanges the code at `${domain}/oauth2/token`.
 * - Tokens live in this object's memory only, never in storage: a reload means signing in again (Cognito's
 *   session cookie makes that one redirect, without the form). They are refreshed (`grant_type=refresh_token`)
 *   after `refreshDelayMs` of the access token's lifetime. A refresh the service refuses ends the sign-in
 *   (`expired`, with a message); one that does not reach it is tried again while the access token lasts.
 * - `signOut` revokes the refresh token (`${domain}/oauth2/revoke`), forgets the tokens and goes to
 *   `${domain}/logout`, which comes back to the page, signed out.
 */

import type { Timers } from "./connection";
import { isLoopback } from "./loopback";
import { base64ToBytes, bytesToBase64 } from "./pcm";

export interface AuthConfig {
  /** The hosted UI's origin, e.g. `https://<prefix>.auth.<region>.amazoncognito.com`. */
  domain: string;
  clientId: string;
  scopes: string[];
}

export type SignInStatus = "signed-out" | "signing-in" | "signed-in" | "expired";

export interface SignInSnapshot {
  status: SignInStatus;
  /** What the page presents to the server (`?token=`) while signed in. */
  accessToken: string | null;
  username: string | null;
  /** When the access token expires (ms since the epoch). */
  expiresAt: number | null;
  /** Why the last sign-in or refresh failed, in words for the person; null when nothing failed. */
  message: string | null;
  /** Refreshes that succeeded since the sign-in. */
  refreshes: number;
}

/** What survives the redirect to the hosted UI (sessionStorage): never a token. */
export interface PendingSignIn {
  state: string;
  verifier: string;
  /** The page's address (path, query, fragment) when sign-in began, to go back to. */
  returnTo: string;
}

/** The parameters Cognito's redirect brought, and the sign-in this page started (if it did). */
export interface SignInCallback {
  state: string;
  code: string | null;
  error: string | null;
  errorDescription: string | null;
  pending: PendingSignIn | null;
}

export type PendingStorage = Pick<Storage, "getItem" | "setItem" | "removeItem">;

export interface SignInOptions {
  config: AuthConfig;
  /** The page's own URL, `${location.origin}/`: the app client's callback and sign-out URL. */
  redirectUri: string;
  /** sessionStorage: the pending sign-in only. */
  storage: PendingStorage | undefined;
  fetch?: typeof fetch;
  navigate?: (url: string) => void;
  timers?: Timers;
  /** Wall-clock time in ms since the epoch (tokens' `exp` is wall-clock time). */
  now?: () => number;
  randomBytes?: (n: number) => Uint8Array;
  /** How long a token or revoke request may take. */
  requestTimeoutMs?: number;
}

export const PENDING_KEY = "csm.signIn.pending";
const RETRY_MS = 15_000; // a refresh that did not reach the service is tried again after this
const MIN_RETRY_MS = 1000;

// ---- config.json's `auth` -------------------------------------------------------------------------

/** config.json's `auth`, checked: an https origin (http only on loopback, for the local stand-in), a client id. */
export function parseAuthConfig(value: unknown): AuthConfig | null {
  if (typeof value !== "object" || value === null) return null;
  const { domain, clientId, scopes } = value as Record<string, unknown>;
  if (typeof domain !== "string" || typeof clientId !== "string" || clientId.trim() === "") return null;
  let url: URL;
  try {
    url = new URL(domain.trim());
  } catch {
    return null;
  }
  if (url.protocol !== "https:" && !(url.protocol === "http:" && isLoopback(url.hostname))) return null;
  const list = Array.isArray(scopes) ? scopes.filter((s): s is string => typeof s === "string" && /^\S+$/.test(s)) : [];
  return { domain: url.origin, clientId: clientId.trim(), scopes: list.length ? list : ["openid"] };
}

// ---- PKCE -----------------------------------------------------------------------------------------

/** Base64url without padding (RFC 4648 section 5), as PKCE and JWTs write it. */
export function base64url(bytes: Uint8Array): string {
  return bytesToBase64(bytes).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function fromBase64url(text: string): Uint8Array {
  const padded = text + "=".repeat((4 - (text.length % 4)) % 4);
  return base64ToBytes(padded.replace(/-/g, "+").replace(/_/g, "/"));
}

/** The S256 code challenge: base64url(SHA-256(verifier)) (RFC 7636, section 4.2). */
export async function codeChallenge(verifier: string): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(verifier));
  return base64url(new Uint8Array(digest));
}

function defaultRandomBytes(n: number): Uint8Array {
  return crypto.getRandomValues(new Uint8Array(n));
}

// ---- the redirect back ----------------------------------------------------------------------------

function readPending(storage: PendingStorage | undefined): PendingSignIn | null {
  try {
    const raw = storage?.getItem(PENDING_KEY);
    if (!raw) return null;
    const value = JSON.parse(raw) as Partial<PendingSignIn>;
    if (typeof value.state !== "string" || typeof value.verifier !== "string") return null;
    return { state: value.state, verifier: value.verifier, returnTo: typeof value.returnTo === "string" ? value.returnTo : "/" };
  } catch {
    return null;
  }
}

function removePending(storage: PendingStorage | undefined): void {
  try {
    storage?.removeItem(PENDING_KEY);
  } catch {
    // unavailable storage holds nothing
  }
}

/** A path on this page's own origin (never `//host`, which would leave it). */
function isLocalPath(path: string): boolean {
  return path.startsWith("/") && !path.startsWith("//") && !path.startsWith("/\\");
}

/**
 * Cognito's redirect back (`?code=` or `?error=`, with `state`), or null when the address is no such thing.
 * The pending sign-in is taken out of storage (it is used once), and `address` is what the address bar
 * should show instead: the address sign-in began from when the state matches, else this one without them.
 */
export function takeCallback(href: string, storage: PendingStorage | undefined): { callback: SignInCallback; address: string } | null {
  const url = new URL(href);
  const query = url.searchParams;
  const state = query.get("state");
  if (state === null || (!query.has("code") && !query.has("error"))) return null;
  const pending = readPending(storage);
  removePending(storage);
  const callback: SignInCallback = {
    state,
    code: query.get("code"),
    error: query.get("error"),
    errorDescription: query.get("error_description"),
    pending,
  };
  for (const name of ["code", "state", "error", "error_description", "error_uri"]) query.delete(name);
  const back = pending !== null && pending.state === state && isLocalPath(pending.returnTo);
  return { callback, address: back ? new URL(pending.returnTo, url.origin).toString() : url.toString() };
}

// ---- refresh timing -------------------------------------------------------------------------------

/**
 * When to refresh, after the access token was issued: at 80% of its lifetime or a minute before it expires,
 * whichever is sooner, but never before half of it (a token of a minute or two would otherwise be renewed
 * the moment it arrives).
 */
export function refreshDelayMs(lifetimeMs: number): number {
  return Math.max(lifetimeMs / 2, Math.min(lifetimeMs * 0.8, lifetimeMs - 60_000));
}

// ---- the token endpoint's answers -----------------------------------------------------------------

type TokenResult =
  | { ok: true; body: Record<string, unknown> }
  /** refused: the service answered no (the grant is over); unreachable: it could not be asked (try again). */
  | { ok: false; kind: "refused" | "unreachable"; message: string };

const OAUTH_ERRORS: Record<string, string> = {
  invalid_grant: "the sign-in is no longer valid",
  invalid_client: "the sign-in service does not know this page's app client (auth.clientId in config.json)",
  unauthorized_client: "this page's app client may not sign in this way",
  invalid_request: "the sign-in service refused the request",
  invalid_scope: "the app client does not allow the scopes config.json asks for",
  access_denied: "access was denied",
  unsupported_grant_type: "the app client does not allow this kind of sign-in",
  server_error: "the sign-in service had an error",
  temporarily_unavailable: "the sign-in service is unavailable for now",
};

/** An OAuth error, in words, with the service's own description when it gave one. */
export function describeOAuthError(error: string, description?: string | null): string {
  const words = OAUTH_ERRORS[error] ?? `the sign-in service answered ${error}`;
  return description ? `${words} (${error}: ${description})` : `${words} (${error})`;
}

function decodeClaims(jwt: string | null): Record<string, unknown> | null {
  const part = jwt?.split(".")[1];
  if (!part) return null;
  try {
    const value: unknown = JSON.parse(new TextDecoder().decode(fromBase64url(part)));
    return typeof value === "object" && value !== null ? (value as Record<string, unknown>) : null;
  } catch {
    return null;
  }
}

interface Tokens {
  access: string;
  id: string | null;
  refresh: string | null;
  expiresAt: number;
}

const SIGNED_OUT: SignInSnapshot = { status: "signed-out", accessToken: null, username: null, expiresAt: null, message: null, refreshes: 0 };

export class SignIn {
  private readonly config: AuthConfig;
  private readonly options: SignInOptions;
  private readonly fetch: typeof fetch;
  private readonly navigate: (url: string) => void;
  private readonly timers: Timers;
  private readonly now: () => number;
  private readonly randomBytes: (n: number) => Uint8Array;
  private tokens: Tokens | null = null;
  private timer: unknown = null;
  private snapshot: SignInSnapshot = SIGNED_OUT;
  private readonly listeners = new Set<() => void>();

  constructor(options: SignInOptions) {
    this.options = options;
    this.config = options.config;
    this.fetch = options.fetch ?? ((input, init) => globalThis.fetch(input, init));
    this.navigate = options.navigate ?? ((url) => window.location.assign(url));
    this.timers = options.timers ?? {
      setTimeout: (fn, ms) => globalThis.setTimeout(fn, ms),
      clearTimeout: (h) => globalThis.clearTimeout(h as ReturnType<typeof setTimeout>),
    };
    this.now = options.now ?? Date.now;
    this.randomBytes = options.randomBytes ?? defaultRandomBytes;
  }

  subscribe = (listener: () => void): (() => void) => {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  };

  getSnapshot = (): SignInSnapshot => this.snapshot;

  /** Go to the hosted UI; the page comes back to `redirectUri` and `takeCallback` + `complete` finish. */
  async begin(returnTo = "/"): Promise<void> {
    const verifier = base64url(this.randomBytes(32)); // 43 characters, 256 bits
    const state = base64url(this.randomBytes(16));
    const challenge = await codeChallenge(verifier);
    const pending: PendingSignIn = { state, verifier, returnTo: isLocalPath(returnTo) ? returnTo : "/" };
    try {
      if (!this.options.storage) throw new Error("no sessionStorage");
      this.options.storage.setItem(PENDING_KEY, JSON.stringify(pending));
    } catch {
      this.update({ message: "This browser keeps no session storage for this page, and sign-in needs it." });
      return;
    }
    const url = new URL("/oauth2/authorize", this.config.domain);
    url.search = new URLSearchParams({
      response_type: "code",
      client_id: this.config.clientId,
      redirect_uri: this.options.redirectUri,
      scope: this.config.scopes.join(" "),
      state,
      code_challenge: challenge,
      code_challenge_method: "S256",
    }).toString();
    this.update({ status: "signing-in", message: null });
    this.navigate(url.toString());
  }

  /** Finish the sign-in Cognito's redirect brought back (from `takeCallback`); true when signed in. */
  async complete(callback: SignInCallback): Promise<boolean> {
    if (callback.pending === null || callback.pending.state !== callback.state) {
      return this.refuse("The sign-in reply did not match a sign-in started on this page, so it was ignored. Sign in again.");
    }
    if (callback.error !== null) return this.refuse(`Sign-in failed: ${describeOAuthError(callback.error, callback.errorDescription)}.`);
    if (!callback.code) return this.refuse("Sign-in failed: the sign-in service sent no code.");
    this.update({ status: "signing-in", message: null });
    const result = await this.tokenRequest({
      grant_type: "authorization_code",
      client_id: this.config.clientId,
      code: callback.code,
      redirect_uri: this.options.redirectUri,
      code_verifier: callback.pending.verifier,
    });
    if (!result.ok) return this.refuse(`Sign-in failed: ${result.message}.`);
    return this.accept(result.body, null, 0);
  }

  /** Revoke the refresh token, forget the tokens, and end the hosted UI's session (it comes back here). */
  async signOut(): Promise<void> {
    const tokens = this.tokens;
    this.forget();
    this.snapshot = SIGNED_OUT;
    this.emit();
    if (tokens?.refresh) {
      try {
        await this.fetch(new URL("/oauth2/revoke", this.config.domain).toString(), this.post({ token: tokens.refresh, client_id: this.config.clientId }));
      } catch {
        // Signed out on this page regardless; the refresh token stays valid at the service until it expires.
      }
    }
    const url = new URL("/logout", this.config.domain);
    url.search = new URLSearchParams({ client_id: this.config.clientId, logout_uri: this.options.redirectUri }).toString();
    this.navigate(url.toString());
  }

  /** Stop the refresh timer (the page is going away). */
  dispose(): void {
    this.clearTimer();
  }

  // ---- internals --------------------------------------------------------------------------------

  private async refresh(): Promise<void> {
    const tokens = this.tokens;
    if (tokens === null) return;
    if (tokens.refresh === null) {
      this.expire("Your sign-in has ended (no refresh token). Sign in again.");
      return;
    }
    const result = await this.tokenRequest({ grant_type: "refresh_token", client_id: this.config.clientId, refresh_token: tokens.refresh });
    if (this.tokens !== tokens) return; // signed out (or in again) meanwhile
    if (result.ok) {
      this.accept(result.body, tokens.refresh, this.snapshot.refreshes + 1);
      return;
    }
    const left = tokens.expiresAt - this.now();
    if (result.kind === "unreachable" && left / 2 >= MIN_RETRY_MS) {
      this.schedule(Math.min(RETRY_MS, left / 2));
      return;
    }
    this.expire(`Your sign-in could not be renewed: ${result.message}. Sign in again.`);
  }

  /** Take a token response; `refresh` is the refresh token to keep when the response has none. */
  private accept(body: Record<string, unknown>, refresh: string | null, refreshes: number): boolean {
    const access = typeof body.access_token === "string" && body.access_token ? body.access_token : null;
    if (access === null) return this.refuse("Sign-in failed: the sign-in service sent no access token.");
    const claims = decodeClaims(access);
    let lifetimeS = typeof body.expires_in === "number" && body.expires_in > 0 ? body.expires_in : null;
    if (lifetimeS === null && typeof claims?.exp === "number" && typeof claims.iat === "number") lifetimeS = claims.exp - claims.iat;
    if (lifetimeS === null || !(lifetimeS > 0)) return this.refuse("Sign-in failed: the access token has no lifetime.");
    const id = typeof body.id_token === "string" ? body.id_token : null;
    const now = this.now();
    this.tokens = {
      access,
      id,
      refresh: typeof body.refresh_token === "string" && body.refresh_token ? body.refresh_token : refresh,
      expiresAt: now + lifetimeS * 1000,
    };
    const idClaims = decodeClaims(id);
    const name = [idClaims?.["cognito:username"], idClaims?.email, claims?.username].find((v) => typeof v === "string");
    this.snapshot = {
      status: "signed-in",
      accessToken: access,
      username: (name as string | undefined) ?? null,
      expiresAt: this.tokens.expiresAt,
      message: null,
      refreshes,
    };
    this.schedule(refreshDelayMs(lifetimeS * 1000));
    this.emit();
    return true;
  }

  private refuse(message: string): false {
    this.forget();
    this.snapshot = { ...SIGNED_OUT, message };
    this.emit();
    return false;
  }

  private expire(message: string): void {
    this.forget();
    this.snapshot = { ...SIGNED_OUT, status: "expired", message };
    this.emit();
  }

  private forget(): void {
    this.tokens = null;
    this.clearTimer();
  }

  private schedule(delayMs: number): void {
    this.clearTimer();
    this.timer = this.timers.setTimeout(() => {
      this.timer = null;
      void this.refresh();
    }, delayMs);
  }

  private clearTimer(): void {
    if (this.timer !== null) this.timers.clearTimeout(this.timer);
    this.timer = null;
  }

  private post(form: Record<string, string>): RequestInit {
    return {
      method: "POST",
      headers: { "Content-Type": "application/x-www-form-urlencoded" },
      body: new URLSearchParams(form).toString(),
      cache: "no-store",
      signal: AbortSignal.timeout(this.options.requestTimeoutMs ?? 10_000),
    };
  }

  private async tokenRequest(form: Record<string, string>): Promise<TokenResult> {
    const endpoint = new URL("/oauth2/token", this.config.domain).toString();
    let res: Response;
    try {
      res = await this.fetch(endpoint, this.post(form));
    } catch {
      return { ok: false, kind: "unreachable", message: `could not reach the sign-in service at ${this.config.domain}` };
    }
    let body: unknown = null;
    try {
      body = await res.json();
    } catch {
      // not JSON: described by its status below
    }
    const fields = typeof body === "object" && body !== null ? (body as Record<string, unknown>) : null;
    if (res.ok && fields !== null) return { ok: true, body: fields };
    const transient = res.status >= 500 || res.status === 429;
    if (!res.ok && typeof fields?.error === "string") {
      const description = typeof fields.error_description === "string" ? fields.error_description : null;
      return { ok: false, kind: transient ? "unreachable" : "refused", message: describeOAuthError(fields.error, description) };
    }
    const message = res.ok ? "the sign-in service's answer was not JSON" : `the sign-in service answered HTTP ${res.status}`;
    return { ok: false, kind: transient ? "unreachable" : "refused", message };
  }

  private update(changes: Partial<SignInSnapshot>): void {
    this.snapshot = { ...this.snapshot, ...changes };
    this.emit();
  }

  private emit(): void {
    for (const listener of this.listeners) listener();
  }
}
