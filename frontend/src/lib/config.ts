/**
 * Where the page connects, and how.
 *
 * Each setting is taken from the first place that has it: the page's address (`?endpoint=`; the token as
 * `#token=`, or `?token=` from older links), then what the person saved in the settings panel
 * (localStorage), then `config.json` next to index.html (written by the deployment; a 404 means "none"),
 * then the default: the same origin's `/v1/realtime`. `?voiceProcessing=off` turns echo cancellation,
 * noise suppression and AGC off.
 *
 * Which endpoints the page connects to. The token goes wherever the page connects, so neither a link nor
 * an old saved setting may choose the host. The page accepts only
 * - its own origin (`ws://HOST/...` on an http page, `wss://HOST/...` on an https one), or
 * - an endpoint that `config.json` lists (`endpoint`, or any of an `endpoints` array): the deployment that
 *   served the page vouches for it.
 * An endpoint from the address or the saved settings that is neither is rejected (`rejected`, which the page
 * shows) and the next source is used, down to the default. Plaintext `ws://` is accepted only to a loopback
 * host, or to the page's own host when the page itself came over http (the page's own traffic is then
 * already in the clear). A token from the address goes only with the address's endpoint: when that endpoint
 * is rejected, the address's token is dropped too.
 *
 * Tokens are kept out of addresses where possible. A link should carry the token in its fragment,
 * `#token=...`: browsers never send a fragment to a server, so it stays out of access logs and Referer
 * headers. `?token=` is still read, for older links. Either way the page saves the token (when it is used:
 * see `addressToken`) and removes it from the address bar at once (`withoutToken` + history.replaceState),
 * so it does not linger in the history, in bookmarks, or in a screenshot of the page.
 *
 * config.json may also carry `auth` (`{"domain", "clientId", "scopes"}`): the Cognito user pool people sign
 * in with (signIn.ts). Signed in, the page's token is the access token; without `auth`, nothing changes.
 */

import { isLoopback } from "./loopback";
import { type AuthConfig, parseAuthConfig } from "./signIn";

export interface EndpointSettings {
  endpoint?: string;
  token?: string;
}

/** config.json: the page's default endpoint (`endpoint`, else the first of `endpoints`) and token, and
 * every endpoint the deployment lists (`endpoint` and `endpoints` together); `auth`: sign-in (signIn.ts). */
export interface ConfigFile extends EndpointSettings {
  endpoints?: string[];
  auth?: AuthConfig;
}

/** "query" is the page's address: its query, or for the token also its fragment. */
export type SettingSource = "query" | "saved" | "config" | "default";

export interface ResolvedSettings {
  endpoint: string;
  /** Endpoints that were given but may not be used (skipped), with where they came from and why. */
  rejected: { source: SettingSource; endpoint: string; reason: string }[];
  /** The endpoints config.json lists, as socket URLs: with the page's own origin, all the page will use. */
  listed: string[];
  token: string;
  voiceProcessing: boolean;
  endpointSource: SettingSource;
  tokenSource: SettingSource;
}

interface LocationLike {
  protocol: string;
  host: string;
  hostname: string;
  origin: string;
}

export const STORAGE_KEY = "csm.settings";

export function defaultEndpoint(location: LocationLike): string {
  return `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/realtime`;
}

function clean(value: unknown): string | undefined {
  return typeof value === "string" && value.trim() !== "" ? value.trim() : undefined;
}

/** The page's address, as the settings read it: `?endpoint=`, and the token from `#token=` or `?token=`. */
function addressSettings(search: string, hash: string): EndpointSettings {
  const query = new URLSearchParams(search);
  const fragment = new URLSearchParams(hash.replace(/^#/, ""));
  return { endpoint: clean(query.get("endpoint")), token: clean(fragment.get("token")) ?? clean(query.get("token")) };
}

export function resolveSettings(input: {
  search: string;
  hash?: string;
  location: LocationLike;
  saved?: EndpointSettings | null;
  config?: ConfigFile | null;
}): ResolvedSettings {
  const { location, config } = input;
  const address = addressSettings(input.search, input.hash ?? "");
  const listed = listedEndpoints(config, location);
  const layers: [SettingSource, EndpointSettings | null | undefined][] = [
    ["query", address],
    ["saved", input.saved],
    ["config", config && { endpoint: clean(config.endpoint) ?? listed[0], token: config.token }],
  ];
  const rejected: ResolvedSettings["rejected"] = [];
  const pick = (from: typeof layers, key: keyof EndpointSettings, fallback: string, check: (v: string) => string = (v) => v): [string, SettingSource] => {
    for (const [source, layer] of from) {
      const value = clean(layer?.[key]);
      if (value === undefined) continue;
      try {
        return [check(value), source];
      } catch (e) {
        rejected.push({ source, endpoint: value, reason: (e as Error).message });
      }
    }
    return [fallback, "default"];
  };
  const [endpoint, endpointSource] = pick(layers, "endpoint", defaultEndpoint(location), (v) => acceptEndpoint(v, location, listed));
  // Every endpoint that gets here is the page's own or listed, so any token may go with it. But a link's
  // token was meant for the link's endpoint: when that was refused, the link's token is not used either.
  const linkRefused = rejected.some((r) => r.source === "query");
  const [token, tokenSource] = pick(linkRefused ? layers.slice(1) : layers, "token", "");
  const vp = (new URLSearchParams(input.search).get("voiceProcessing") ?? "on").toLowerCase();
  return {
    endpoint,
    rejected,
    listed,
    token,
    voiceProcessing: !["off", "false", "0", "no"].includes(vp),
    endpointSource,
    tokenSource,
  };
}

/** config.json's `endpoint` and `endpoints`, as socket URLs; entries that are not URLs are left out. */
function listedEndpoints(config: ConfigFile | null | undefined, location: LocationLike): string[] {
  const given = [config?.endpoint, ...(config?.endpoints ?? [])].map(clean).filter((v) => v !== undefined);
  const urls = given.flatMap((v) => {
    try {
      return [toWebSocketUrl(v, location)];
    } catch {
      return []; // config.json's own `endpoint` is reported when it is tried; a bad list entry allows nothing
    }
  });
  return [...new Set(urls)];
}

/** An absolute ws:// or wss:// URL: http(s) becomes ws(s), a path is taken relative to the page. */
export function toWebSocketUrl(endpoint: string, location: LocationLike): string {
  let url: URL;
  try {
    url = new URL(endpoint, location.origin);
  } catch {
    throw new Error(`${endpoint} is not a URL`);
  }
  if (url.protocol === "http:") url.protocol = "ws:";
  else if (url.protocol === "https:") url.protocol = "wss:";
  if (url.protocol !== "ws:" && url.protocol !== "wss:") {
    throw new Error(`the endpoint must be a ws://, wss://, http:// or https:// URL, not ${endpoint}`);
  }
  return url.toString();
}

/**
 * The endpoint as a socket URL, if the page may send its token there: its own origin or one config.json
 * lists (`listed`, as socket URLs), and plaintext only where nothing new is exposed. Throws why not.
 */
export function acceptEndpoint(endpoint: string, location: LocationLike, listed: readonly string[]): string {
  const url = new URL(toWebSocketUrl(endpoint, location));
  if (!isPageOrigin(url, location) && !listed.some((l) => sameEndpoint(new URL(l), url))) {
    throw new Error(`${url} is neither this page's server nor listed in config.json, so the page will not connect there`);
  }
  if (url.protocol === "ws:" && !plaintextAllowed(url, location)) {
    throw new Error(`${url} is plaintext ws://, which would send the token unencrypted; use wss://`);
  }
  return url.toString();
}

/** The page's own origin, in WebSocket terms: the same host and port, ws for http and wss for https. */
function isPageOrigin(url: URL, location: LocationLike): boolean {
  return url.host === location.host && url.protocol === (location.protocol === "https:" ? "wss:" : "ws:");
}

/** Listed endpoints match by origin, path (a trailing slash aside) and query. */
function sameEndpoint(a: URL, b: URL): boolean {
  const key = (u: URL) => `${u.origin}${u.pathname.replace(/\/+$/, "")}${u.search}`;
  return key(a) === key(b);
}

/** ws:// is fine to this machine, or to the host that served the page over plain http anyway. */
function plaintextAllowed(url: URL, location: LocationLike): boolean {
  return isLoopback(url.hostname) || (location.protocol === "http:" && url.hostname === location.hostname);
}

/** The socket URL: browsers cannot set headers on a WebSocket, so the token travels in the query. */
export function realtimeUrl(endpoint: string, params: { token?: string; conversationId?: string }): string {
  const url = new URL(endpoint);
  if (params.token) url.searchParams.set("token", params.token);
  if (params.conversationId) url.searchParams.set("conversation_id", params.conversationId);
  return url.toString();
}

/** Whether the endpoint is this page's own server (then `/v1/voices` and `/healthz` can be asked). */
export function isSameOrigin(endpoint: string, location: LocationLike): boolean {
  try {
    const url = new URL(endpoint);
    return url.host === location.host && url.pathname.replace(/\/+$/, "") === "/v1/realtime";
  } catch {
    return false;
  }
}

/** The token the page's address brought, to save: only when it is the one in use (its endpoint, if the
 * address named one, was accepted), so a link's token is kept exactly when it was sent. */
export function addressToken(resolved: ResolvedSettings): string | null {
  return resolved.tokenSource === "query" ? resolved.token : null;
}

/** The address without its token (`?token=`, `#token=`), for history.replaceState; null when it has none. */
export function withoutToken(href: string): string | null {
  const url = new URL(href);
  const fragment = new URLSearchParams(url.hash.replace(/^#/, ""));
  if (!url.searchParams.has("token") && !fragment.has("token")) return null;
  if (url.searchParams.has("token")) url.searchParams.delete("token");
  if (fragment.has("token")) {
    fragment.delete("token");
    url.hash = fragment.toString();
  }
  return url.toString();
}

/** `config.json` beside the page, or null when there is none (404) or it is unusable. */
export async function loadConfigFile(fetchFn: typeof fetch, url = "config.json"): Promise<ConfigFile | null> {
  try {
    const res = await fetchFn(url, { cache: "no-store", signal: AbortSignal.timeout(5000) });
    if (!res.ok) return null;
    const body: unknown = await res.json();
    if (typeof body !== "object" || body === null) return null;
    const { endpoint, endpoints, token, auth } = body as Record<string, unknown>;
    const list = Array.isArray(endpoints) ? endpoints.map(clean).filter((v) => v !== undefined) : [];
    const signIn = auth === undefined ? null : parseAuthConfig(auth);
    if (auth !== undefined && signIn === null) console.warn("config.json: `auth` is unusable (it needs an https domain and a clientId); sign-in is off");
    return {
      endpoint: clean(endpoint),
      token: clean(token),
      ...(list.length ? { endpoints: list } : {}),
      ...(signIn ? { auth: signIn } : {}),
    };
  } catch {
    return null;
  }
}

export function loadSaved(storage: Pick<Storage, "getItem"> | undefined): EndpointSettings | null {
  try {
    const raw = storage?.getItem(STORAGE_KEY);
    if (!raw) return null;
    const value = JSON.parse(raw) as EndpointSettings;
    return { endpoint: clean(value.endpoint), token: clean(value.token) };
  } catch {
    return null;
  }
}

export function saveSettings(storage: Pick<Storage, "setItem" | "removeItem"> | undefined, settings: EndpointSettings): void {
  try {
    const value = { endpoint: clean(settings.endpoint), token: clean(settings.token) };
    if (value.endpoint === undefined && value.token === undefined) storage?.removeItem(STORAGE_KEY);
    else storage?.setItem(STORAGE_KEY, JSON.stringify(value));
  } catch {
    // Storage can be unavailable (private mode); the settings still apply to this page load.
  }
}
