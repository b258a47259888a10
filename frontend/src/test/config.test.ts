import { describe, expect, it, vi } from "vitest";
import {
  acceptEndpoint,
  addressToken,
  isSameOrigin,
  loadConfigFile,
  loadSaved,
  realtimeUrl,
  resolveSettings,
  saveSettings,
  toWebSocketUrl,
  withoutToken,
} from "../lib/config";

const page = { protocol: "http:", host: "127.0.0.1:8123", hostname: "127.0.0.1", origin: "http://127.0.0.1:8123" };
const securePage = { protocol: "https:", host: "demo.example", hostname: "demo.example", origin: "https://demo.example" };
const lanPage = { protocol: "http:", host: "10.0.0.5:8000", hostname: "10.0.0.5", origin: "http://10.0.0.5:8000" };

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
    const listing = { ...config, endpoints: ["ws://127.0.0.1:7000/"] };
    expect(resolveSettings({ search, location: page, config: listing, saved })).toMatchObject({
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

  it("reads an endpoints list beside (or instead of) the endpoint, dropping what is not a string", async () => {
    const body = { endpoint: "wss://a/prod", endpoints: ["wss://b/prod", 7, " "] };
    expect(await loadConfigFile(respond(200, body))).toEqual({ endpoint: "wss://a/prod", token: undefined, endpoints: ["wss://b/prod"] });
    expect(await loadConfigFile(respond(200, { endpoints: "wss://b/prod" }))).toEqual({ endpoint: undefined, token: undefined });
  });

  it("reads endpoint and token, ignoring blanks and junk", async () => {
    expect(await loadConfigFile(respond(200, { endpoint: "wss://gw/prod", token: " t " }))).toEqual({ endpoint: "wss://gw/prod", token: "t" });
    expect(await loadConfigFile(respond(200, { endpoint: "", token: 5 }))).toEqual({ endpoint: undefined, token: undefined });
    expect(await loadConfigFile(respond(200, "nope"))).toBeNull();
    const broken = (async () => new Response("{not json", { status: 200 })) as unknown as typeof fetch;
    expect(await loadConfigFile(broken)).toBeNull();
  });

  it("reads `auth` (the Cognito hosted UI) exactly as the deployment writes it, and drops an unusable one", async () => {
    const auth = { domain: "https://csm-demo.auth.eu-west-1.amazoncognito.com/", clientId: "abc123", scopes: ["openid", "email", "profile"] };
    expect(await loadConfigFile(respond(200, { endpoint: "wss://gw/prod", auth }))).toEqual({
      endpoint: "wss://gw/prod",
      token: undefined,
      auth: { domain: "https://csm-demo.auth.eu-west-1.amazoncognito.com", clientId: "abc123", scopes: ["openid", "email", "profile"] },
    });
    const warn = vi.spyOn(console, "warn").mockImplementation(() => {});
    for (const bad of [{ ...auth, domain: "http://csm-demo.auth.example" }, { ...auth, clientId: "" }, "yes"]) {
      expect(await loadConfigFile(respond(200, { endpoint: "wss://gw/prod", auth: bad }))).toEqual({ endpoint: "wss://gw/prod", token: undefined });
    }
    expect(warn).toHaveBeenCalledTimes(3);
    warn.mockRestore();
    // Plain http only to this machine (the local stand-in); no scopes means just openid.
    const local = await loadConfigFile(respond(200, { auth: { domain: "http://127.0.0.1:9229", clientId: "local" } }));
    expect(local?.auth).toEqual({ domain: "http://127.0.0.1:9229", clientId: "local", scopes: ["openid"] });
    // The same loopback names as the socket's ws:// (a localhost subdomain is this machine too), no others.
    for (const domain of ["http://auth.localhost:9229", "http://[::1]:9229", "http://localhost:9229"]) {
      expect((await loadConfigFile(respond(200, { auth: { domain, clientId: "local" } })))?.auth?.domain).toBe(domain);
    }
    const sub = "ws://auth.localhost:8000/v1/realtime";
    expect(acceptEndpoint(sub, lanPage, [sub])).toBe(sub);
    const warnAgain = vi.spyOn(console, "warn").mockImplementation(() => {});
    for (const domain of ["http://localhost.example", "http://128.0.0.1"]) {
      expect((await loadConfigFile(respond(200, { auth: { domain, clientId: "local" } })))?.auth).toBeUndefined();
    }
    warnAgain.mockRestore();
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
    const r = resolveSettings({ search: "?endpoint=ftp%3A%2F%2Fx%2F", location: securePage, config: { endpoint: "wss://gw.example/prod" } });
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

describe("which endpoints the page connects to", () => {
  const gateway = "wss://abc.execute-api.us-east-1.amazonaws.com/prod";
  const evil = "?endpoint=wss%3A%2F%2Fevil.example%2F";

  it("a link to another host is refused, and the page falls back to its default", () => {
    const r = resolveSettings({ search: evil, location: securePage });
    expect(r.endpoint).toBe("wss://demo.example/v1/realtime");
    expect(r.endpointSource).toBe("default");
    expect(r.rejected).toEqual([
      { source: "query", endpoint: "wss://evil.example/", reason: expect.stringContaining("neither this page's server nor listed in config.json") },
    ]);
  });

  it("never pairs a saved or config token with an endpoint from the link that is not the page's own or listed", () => {
    const saved = resolveSettings({ search: evil, location: securePage, saved: { token: "saved-secret" } });
    expect(saved).toMatchObject({ endpoint: "wss://demo.example/v1/realtime", token: "saved-secret", tokenSource: "saved" });
    const config = resolveSettings({ search: evil, location: securePage, config: { endpoint: gateway, token: "config-secret" } });
    expect(config).toMatchObject({ endpoint: gateway, endpointSource: "config", token: "config-secret" });
    for (const r of [saved, config]) expect(new URL(r.endpoint).host).not.toBe("evil.example");
  });

  it("a link's token goes only with the link's endpoint: refused together", () => {
    const r = resolveSettings({ search: `${evil}&token=from-link`, location: securePage, saved: { token: "saved" } });
    expect(r).toMatchObject({ endpoint: "wss://demo.example/v1/realtime", token: "saved", tokenSource: "saved" });
    expect(addressToken(r)).toBeNull(); // nor kept
  });

  it("accepts the page's own origin from a link, whatever the path, with the saved token", () => {
    const r = resolveSettings({ search: "?endpoint=%2Fother%2Frealtime", location: securePage, saved: { token: "t" } });
    expect(r).toMatchObject({ endpoint: "wss://demo.example/other/realtime", endpointSource: "query", token: "t" });
    expect(r.rejected).toEqual([]);
  });

  it("accepts any endpoint config.json lists, in `endpoint` or in `endpoints`", () => {
    const config = { endpoint: gateway, endpoints: [gateway, "wss://second.example/prod", "ftp://x/"] };
    for (const listed of [gateway, "https://second.example/prod/"]) {
      const r = resolveSettings({ search: `?${new URLSearchParams({ endpoint: listed })}`, location: securePage, saved: { token: "t" }, config });
      expect(r).toMatchObject({ endpointSource: "query", token: "t", rejected: [] });
    }
    expect(resolveSettings({ search: "", location: securePage, config }).listed).toEqual([gateway, "wss://second.example/prod"]);
    // Listed means this exact endpoint: another path on the same host is not.
    expect(() => acceptEndpoint("wss://second.example/other", securePage, [gateway, "wss://second.example/prod"])).toThrow(/not listed|nor listed/);
  });

  it("with only `endpoints`, the first is the default", () => {
    const r = resolveSettings({ search: "", location: securePage, config: { endpoints: ["wss://a.example/prod", "wss://b.example/prod"] } });
    expect(r).toMatchObject({ endpoint: "wss://a.example/prod", endpointSource: "config" });
  });

  it("refuses a saved endpoint that is neither the page's own nor listed", () => {
    const r = resolveSettings({ search: "", location: securePage, saved: { endpoint: "wss://old-gateway.example/prod", token: "t" } });
    expect(r).toMatchObject({ endpoint: "wss://demo.example/v1/realtime", endpointSource: "default", token: "t" });
    expect(r.rejected).toEqual([{ source: "saved", endpoint: "wss://old-gateway.example/prod", reason: expect.stringContaining("config.json") }]);
  });

  it("another port on the same host is another origin", () => {
    expect(() => acceptEndpoint("ws://127.0.0.1:7000/v1/realtime", page, [])).toThrow(/nor listed/);
    expect(acceptEndpoint("ws://127.0.0.1:8123/v1/realtime", page, [])).toBe("ws://127.0.0.1:8123/v1/realtime");
    // An https page's own origin is wss://, not ws://.
    expect(() => acceptEndpoint("ws://demo.example/v1/realtime", securePage, [])).toThrow();
  });

  it("plaintext ws:// only to loopback, or to the page's own host when the page came over http", () => {
    const listed = ["ws://gw.example/", "ws://localhost:7000/", "ws://127.0.0.2:7000/", "ws://[::1]:7000/", "ws://10.0.0.5:9000/"];
    expect(() => acceptEndpoint("ws://gw.example/", securePage, listed)).toThrow(/plaintext/);
    expect(() => acceptEndpoint("ws://gw.example/", lanPage, listed)).toThrow(/plaintext/);
    for (const loopback of ["ws://localhost:7000/", "ws://127.0.0.2:7000/", "ws://[::1]:7000/"]) {
      expect(acceptEndpoint(loopback, securePage, listed)).toBe(loopback);
    }
    expect(acceptEndpoint("ws://10.0.0.5:9000/", lanPage, listed)).toBe("ws://10.0.0.5:9000/"); // same host, page on http
    expect(() => acceptEndpoint("ws://10.0.0.5:9000/", securePage, listed)).toThrow(/plaintext/);
    // Listed in config.json is not enough for plaintext to a remote host either.
    const r = resolveSettings({ search: "", location: securePage, config: { endpoint: "ws://gw.example/", token: "t" } });
    expect(r).toMatchObject({ endpoint: "wss://demo.example/v1/realtime", endpointSource: "default" });
    expect(r.rejected[0]).toMatchObject({ source: "config", reason: expect.stringContaining("plaintext") });
  });

  it("a host hidden behind userinfo or a protocol-relative path is still another host", () => {
    expect(() => acceptEndpoint("ws://127.0.0.1:8123@evil.example/v1/realtime", page, [])).toThrow(/nor listed/);
    expect(() => acceptEndpoint("//evil.example/v1/realtime", securePage, [])).toThrow(/nor listed/);
  });
});

describe("tokens in the page address", () => {
  it("reads the token from the fragment, before the query", () => {
    expect(resolveSettings({ search: "", hash: "#token=frag", location: page })).toMatchObject({ token: "frag", tokenSource: "query" });
    expect(resolveSettings({ search: "?token=old", hash: "#token=frag", location: page }).token).toBe("frag");
    expect(resolveSettings({ search: "?token=old", hash: "", location: page }).token).toBe("old");
  });

  it("a token the address brought and the page uses is the one to save", () => {
    const r = resolveSettings({ search: "", hash: "#token=frag", location: page, saved: { token: "older" } });
    expect(addressToken(r)).toBe("frag");
    expect(addressToken(resolveSettings({ search: "", location: page, saved: { token: "older" } }))).toBeNull();
  });

  it("the address bar loses the token, from the query and the fragment, and keeps the rest", () => {
    expect(withoutToken("http://h/?token=t&voiceProcessing=off")).toBe("http://h/?voiceProcessing=off");
    expect(withoutToken("http://h/?token=t")).toBe("http://h/");
    expect(withoutToken("http://h/#token=t")).toBe("http://h/");
    expect(withoutToken("http://h/?endpoint=%2Fv1%2Frealtime#token=t&x=1")).toBe("http://h/?endpoint=%2Fv1%2Frealtime#x=1");
    expect(withoutToken("http://h/?voiceProcessing=off#section")).toBeNull();
  });
});
