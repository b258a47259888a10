/**
 * Where the page connects, and how.
 *
 * Each setting is taken from the first place that has it: the page's URL query (`?endpoint=`, `?token=`),
 * then what the person saved in the settings panel (localStorage), then `config.json` next to
 * index.html (written by the deployment; a 404 means "none"), then the default: the same origin's
 * `/v1/realtime`. `?voiceProcessing=off` turns echo cancellation, noise suppression and AGC off.
 */

export interface EndpointSettings {
  endpoint?: string;
  token?: string;
}

export type SettingSource = "query" | "saved" | "config" | "default";

export interface ResolvedSettings {
  endpoint: string;
  /** Endpoints that were given but are not usable URLs (skipped), with where they came from. */
  rejected: { source: SettingSource; endpoint: string; reason: string }[];
  token: string;
  voiceProcessing: boolean;
  endpointSource: SettingSource;
  tokenSource: SettingSource;
}

interface LocationLike {
  protocol: string;
  host: string;
  origin: string;
}

export const STORAGE_KEY = "csm.settings";

export function defaultEndpoint(location: LocationLike): string {
  return `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/realtime`;
}

function clean(value: unknown): string | undefined {
  return typeof value === "string" && value.trim() !== "" ? value.trim() : undefined;
}

export function resolveSettings(input: {
  search: string;
  location: LocationLike;
  saved?: EndpointSettings | null;
  config?: EndpointSettings | null;
}): ResolvedSettings {
  const query = new URLSearchParams(input.search);
  const layers: [SettingSource, EndpointSettings | null | undefined][] = [
    ["query", { endpoint: query.get("endpoint") ?? undefined, token: query.get("token") ?? undefined }],
    ["saved", input.saved],
    ["config", input.config],
  ];
  const rejected: ResolvedSettings["rejected"] = [];
  const pick = (key: keyof EndpointSettings, fallback: string, check: (v: string) => string = (v) => v): [string, SettingSource] => {
    for (const [source, layer] of layers) {
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
  const [endpoint, endpointSource] = pick("endpoint", defaultEndpoint(input.location), (v) => toWebSocketUrl(v, input.location));
  const [token, tokenSource] = pick("token", "");
  const vp = (query.get("voiceProcessing") ?? "on").toLowerCase();
  return {
    endpoint,
    rejected,
    token,
    voiceProcessing: !["off", "false", "0", "no"].includes(vp),
    endpointSource,
    tokenSource,
  };
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

/** `config.json` beside the page, or null when there is none (404) or it is unusable. */
export async function loadConfigFile(fetchFn: typeof fetch, url = "config.json"): Promise<EndpointSettings | null> {
  try {
    const res = await fetchFn(url, { cache: "no-store", signal: AbortSignal.timeout(5000) });
    if (!res.ok) return null;
    const body: unknown = await res.json();
    if (typeof body !== "object" || body === null) return null;
    const { endpoint, token } = body as Record<string, unknown>;
    return { endpoint: clean(endpoint), token: clean(token) };
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
