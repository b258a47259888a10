import { describe, expect, it } from "vitest";
import { isSameOrigin, loadConfigFile, loadSaved, realtimeUrl, resolveSettings, saveSettings, toWebSocketUrl } from "../lib/config";

const page = { protocol: "http:", host: "127.0.0.1:8123", origin: "http://127.0.0.1:8123" };
const securePage = { protocol: "https:", host: "demo.example", origin: "https://demo.example" };

describe("endpoint settings", () => {
  it("defaults to the page's own /v1/realtime, ws or wss by the page's protocol", () => {
    expect(resolveSettings({ search: "", location: page })).toMatchObject({
      endpoint: "ws://127.0.0.1:8123/v1/realtime",
      token: "",
      voiceProcessing: true,
      endpointSource: "default",
    });
    expect(resolveSettings({ search: "", location: securePage }).endpoint).toBe("wss://demo.example/v1/realtime");
  });

  it("takes each setting from the query, then saved settings, then config.json", () => {
    const config = { endpoint: "wss://abc.execute-api.us-east-1.amazonaws.com/prod", token: "from-config" };
    expect(resolveSettings({ search: "", location: page, config })).toMatchObject({
      endpoint: config.endpoint,
      token: "from-config",
      endpointSource: "config",
    });
    const saved = { token: "saved-token" };
    expect(resolveSettings({ search: "", location: page, config, saved })).toMatchObject({
      endpoint: config.endpoint,
      token: "saved-token",
      tokenSource: "saved",
    });
    const search = "?endpoint=ws%3A%2F%2F127.0.0.1%3A7000%2F&token=q";
    expect(resolveSettings({ search, location: page, config, saved })).toMatchObject({
      endpoint: "ws://127.0.0.1:7000/",
      token: "q",
      endpointSource: "query",
      tokenSource: "query",
    });
  });

  it("?voiceProcessing=off turns echo cancellation, noise suppression and AGC off", () => {
    expect(resolveSettings({ search: "?voiceProcessing=off", location: page }).voiceProcessing).toBe(false);
    expect(resolveSettings({ search: "?voiceProcessing=on", location: page }).voiceProcessing).toBe(true);
  });

  it("accepts http(s) URLs and paths as endpoints", () => {
    expect(toWebSocketUrl("https://x.example/v1/realtime", page)).toBe("wss://x.example/v1/realtime");
    expect(toWebSocketUrl("/v1/realtime", page)).toBe("ws://127.0.0.1:8123/v1/realtime");
    expect(() => toWebSocketUrl("ftp://x/", page)).toThrow();
  });

  it("puts the token and conversation id in the socket URL, keeping the endpoint's own query", () => {
    const url = new URL(realtimeUrl("wss://gw.example/prod?stage=1", { token: "a b&c", conversationId: "conv_1" }));
    expect(url.searchParams.get("stage")).toBe("1");
    expect(url.searchParams.get("token")).toBe("a b&c");
    expect(url.searchParams.get("conversation_id")).toBe("conv_1");
    expect(realtimeUrl("ws://h/v1/realtime", {})).toBe("ws://h/v1/realtime");
  });

  it("knows when the endpoint is this page's server", () => {
    expect(isSameOrigin("ws://127.0.0.1:8123/v1/realtime", page)).toBe(true);
    expect(isSameOrigin("ws://127.0.0.1:7000/", page)).toBe(false);
  });
});

describe("config.json and saved settings", () => {
  const respond = (status: number, body: unknown) => (async () => new Response(JSON.stringify(body), { status })) as unknown as typeof fetch;

  it("a 404 means no config", async () => {
    expect(await loadConfigFile(respond(404, { detail: "Not Found" }))).toBeNull();
  });

  it("reads endpoint and token, ignoring blanks and junk", async () => {
    expect(await loadConfigFile(respond(200, { endpoint: "wss://gw/prod", token: " t " }))).toEqual({ endpoint: "wss://gw/prod", token: "t" });
    expect(await loadConfigFile(respond(200, { endpoint: "", token: 5 }))).toEqual({ endpoint: undefined, token: undefined });
    expect(await loadConfigFile(respond(200, "nope"))).toBeNull();
    const broken = (async () => new Response("{not json", { status: 200 })) as unknown as typeof fetch;
    expect(await loadConfigFile(broken)).toBeNull();
  });

  it("saves and loads settings; clearing both removes them", () => {
    const store = new Map<string, string>();
    const storage = {
      getItem: (k: string) => store.get(k) ?? null,
      setItem: (k: string, v: string) => void store.set(k, v),
      removeItem: (k: string) => void store.delete(k),
    };
    saveSettings(storage, { endpoint: "wss://gw/prod", token: "" });
    expect(loadSaved(storage)).toEqual({ endpoint: "wss://gw/prod", token: undefined });
    saveSettings(storage, { endpoint: " ", token: "" });
    expect(store.size).toBe(0);
    expect(loadSaved(storage)).toBeNull();
  });
});

describe("unusable endpoints", () => {
  it("are skipped for the next source, and reported", () => {
    const r = resolveSettings({ search: "?endpoint=ftp%3A%2F%2Fx%2F", location: page, config: { endpoint: "wss://gw.example/prod" } });
    expect(r.endpoint).toBe("wss://gw.example/prod");
    expect(r.endpointSource).toBe("config");
    expect(r.rejected).toEqual([{ source: "query", endpoint: "ftp://x/", reason: expect.stringContaining("ws://") }]);
  });

  it("fall back to the default when nothing is usable", () => {
    const r = resolveSettings({ search: "?endpoint=http%3A%2F%2F%5B%3A%3A1", location: page });
    expect(r.endpoint).toBe("ws://127.0.0.1:8123/v1/realtime");
    expect(r.rejected).toHaveLength(1);
  });
});
