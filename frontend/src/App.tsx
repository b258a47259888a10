import { useCallback, useEffect, useMemo, useRef, useState, useSyncExternalStore } from "react";
import { Composer } from "./components/Composer";
import { FailureScreen } from "./components/FailureScreen";
import { Orb } from "./components/Orb";
import { SettingsDialog } from "./components/SettingsDialog";
import { SignInControl } from "./components/SignInControl";
import { Transcript } from "./components/Transcript";
import { Visualizer } from "./components/Visualizer";
import { AudioSession, MicrophoneError } from "./lib/audioSession";
import {
  addressToken,
  type ConfigFile,
  defaultEndpoint,
  type EndpointSettings,
  isSameOrigin,
  loadConfigFile,
  loadSaved,
  resolveSettings,
  saveSettings,
  withoutToken,
} from "./lib/config";
import { type ClientSnapshot, RealtimeClient } from "./lib/realtimeClient";
import { SignIn, type SignInCallback, type SignInSnapshot } from "./lib/signIn";
import { installTestHook } from "./testHook";

const VOICE_KEY = "csm.voice";
const TRANSCRIPT_KEY = "csm.showTranscript";

function storage(): Storage | undefined {
  try {
    return window.localStorage;
  } catch {
    return undefined;
  }
}

/** Where a sign-in's state and verifier wait out the redirect (never a token: see signIn.ts). */
export function sessionStore(): Storage | undefined {
  try {
    return window.sessionStorage;
  } catch {
    return undefined;
  }
}

const noSubscribe = () => () => {};
const noSignIn = (): SignInSnapshot | null => null;

function statusText(s: ClientSnapshot): string {
  switch (s.phase) {
    case "idle":
      return "Press Start and talk";
    case "connecting":
      return "Connecting…";
    case "listening":
      return s.userSpeaking ? "Listening — you're speaking" : "Listening";
    case "thinking":
      return "Thinking…";
    case "speaking":
      return "Speaking";
    case "reconnecting":
      return s.reconnect ? `Connection lost — reconnecting (try ${s.reconnect.attempt} of ${s.reconnect.max})…` : "Reconnecting…";
    case "error":
      return s.failure?.message ?? "Something went wrong";
  }
}

function voiceLabel(voice: string, defaultVoice: string | null): string {
  const name = voice === "none" ? "None (CSM picks)" : voice;
  return voice === defaultVoice ? `${name} — default` : name;
}

function formatSeconds(ms: number): string {
  return `${(ms / 1000).toFixed(2)} s`;
}

function median(values: readonly number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

interface ServerPreview {
  voices: string[];
  defaultVoice: string | null;
  randomWeights: boolean | null;
}

interface AppProps {
  /** Cognito's redirect back, taken out of the address before the page rendered (main.tsx). */
  signInCallback?: SignInCallback | null;
}

export function App({ signInCallback = null }: AppProps) {
  const [saved, setSaved] = useState<EndpointSettings | null>(() => loadSaved(storage()));
  const [fileConfig, setFileConfig] = useState<ConfigFile | null | undefined>(undefined);
  // Read once: the token is taken out of the address bar as soon as the page is up.
  const [address] = useState(() => ({ search: window.location.search, hash: window.location.hash }));
  const resolved = useMemo(
    () => resolveSettings({ ...address, location: window.location, saved, config: fileConfig ?? null }),
    [address, saved, fileConfig],
  );
  const resolvedRef = useRef(resolved);
  resolvedRef.current = resolved;
  const [voiceProcessing, setVoiceProcessing] = useState(resolved.voiceProcessing);
  const [showTranscript, setShowTranscript] = useState(() => storage()?.getItem(TRANSCRIPT_KEY) !== "off");
  const [settingsOpen, setSettingsOpen] = useState(false);
  const [microphone, setMicrophone] = useState(true);
  const [preview, setPreview] = useState<ServerPreview>({ voices: [], defaultVoice: null, randomWeights: null });

  // Sign-in, when config.json has `auth`. The object lives as long as the page (its tokens in its memory).
  const authConfig = fileConfig?.auth ?? null;
  const authKey = authConfig === null ? null : JSON.stringify(authConfig);
  const signIn = useMemo(
    () => (authConfig === null ? null : new SignIn({ config: authConfig, redirectUri: `${window.location.origin}/`, storage: sessionStore() })),
    [authKey], // one object per distinct `auth` (config.json is read once)
  );
  const signInRef = useRef(signIn);
  signInRef.current = signIn;
  const auth = useSyncExternalStore(signIn?.subscribe ?? noSubscribe, signIn?.getSnapshot ?? noSignIn);
  // Signed in, the access token is the page's token; otherwise the shared one (settings panel, #token=).
  const token = auth?.accessToken ?? resolved.token;
  const tokenRef = useRef(token);
  tokenRef.current = token;

  const [client] = useState(
    () =>
      new RealtimeClient({
        endpoint: resolved.endpoint,
        token: resolved.token,
        voice: storage()?.getItem(VOICE_KEY) ?? null,
        diagnoseRefusal: async () => {
          // A refused handshake looks the same as a dead server to a browser. When the endpoint is this
          // page's own server, ask it: alive means the token was refused. Elsewhere, a page that could sign
          // in but has no token at all was refused for that (a deployment with sign-in admits no one without).
          if (!isSameOrigin(resolvedRef.current.endpoint, window.location)) {
            return signInRef.current !== null && tokenRef.current === "" ? "auth" : "unknown";
          }
          try {
            return (await fetch("/healthz", { cache: "no-store" })).ok ? "auth" : "down";
          } catch {
            return "down";
          }
        },
      }),
  );
  const snap = useSyncExternalStore(client.subscribe, client.getSnapshot);
  const [audio, setAudio] = useState<AudioSession | null>(null);
  const audioRef = useRef<AudioSession | null>(null);
  const lastAudio = useRef<AudioSession | null>(null);

  useEffect(() => {
    void loadConfigFile(fetch).then(setFileConfig);
    installTestHook(
      client,
      () => audioRef.current ?? lastAudio.current,
      () => signInRef.current?.getSnapshot() ?? null,
    );
  }, [client]);

  // Every connection from now on (a reconnect, a resume) presents the current token: a refreshed one too.
  useEffect(() => client.configure(resolved.endpoint, token), [client, resolved.endpoint, token]);

  // Back from the hosted UI: exchange the code, once (the callback is used up here).
  const callbackRef = useRef(signInCallback);
  useEffect(() => {
    const callback = callbackRef.current;
    if (signIn === null || callback === null) return;
    callbackRef.current = null;
    void signIn.complete(callback);
  }, [signIn]);

  useEffect(() => {
    const bare = withoutToken(window.location.href);
    if (bare !== null) window.history.replaceState(window.history.state, "", bare);
  }, []);

  // The address's token is kept once config.json is known: it decides whether the address's endpoint,
  // and so its token, is used.
  useEffect(() => {
    const token = fileConfig === undefined ? null : addressToken(resolvedRef.current);
    if (token === null) return;
    saveSettings(storage(), { ...loadSaved(storage()), token });
    setSaved(loadSaved(storage()));
  }, [fileConfig]);

  // Before any call, this page's own server can say which voices it has and whether it runs on noise.
  useEffect(() => {
    if (fileConfig === undefined || !isSameOrigin(resolved.endpoint, window.location)) return;
    let cancelled = false;
    void (async () => {
      try {
        const [voices, ready] = await Promise.all([
          fetch("/v1/voices").then((r) => (r.ok ? r.json() : null)),
          fetch("/readyz").then((r) => (r.ok ? r.json() : null)),
        ]);
        if (cancelled) return;
        setPreview({
          voices: Array.isArray(voices?.voices) ? voices.voices.map((v: { id: string }) => v.id) : [],
          defaultVoice: typeof voices?.default === "string" ? voices.default : null,
          randomWeights: typeof ready?.random_weights === "boolean" ? ready.random_weights : null,
        });
      } catch {
        // Not reachable yet: the socket's x-server.info tells the same once connected.
      }
    })();
    return () => {
      cancelled = true;
    };
  }, [fileConfig, resolved.endpoint]);

  const closeAudio = useCallback(() => {
    const session = audioRef.current;
    audioRef.current = null;
    setAudio(null);
    client.setPlayer(null);
    void session?.close();
  }, [client]);

  // The call is over (ended, failed, closed by the server): release the microphone and the speakers.
  useEffect(() => {
    if ((snap.phase === "idle" || snap.phase === "error") && audioRef.current !== null) closeAudio();
  }, [snap.phase, closeAudio]);

  useEffect(() => {
    if (snap.notice === null) return;
    const id = snap.notice.id;
    const timer = setTimeout(() => client.dismissNotice(id), 8000);
    return () => clearTimeout(timer);
  }, [client, snap.notice]);

  const status = statusText(snap);
  useEffect(() => {
    document.title = snap.phase === "idle" ? "CSM — voice conversation" : `CSM — ${status}`;
  }, [snap.phase, status]);

  /** Must run inside the click: the AudioContext is created and resumed synchronously here. */
  const startCall = (microphone: boolean, resume: boolean) => {
    if (audioRef.current !== null) closeAudio();
    let session: AudioSession;
    try {
      session = new AudioSession({
        microphoneEnded: () => client.fail("mic-missing", "The microphone stopped (it was unplugged or access was revoked)."),
        started: (id) => client.playbackStarted(id, session.outputLatencyMs),
        finished: (id) => client.playbackFinished(id),
        drained: () => client.playbackDrained(),
        progress: (_stats, items) => client.playbackProgress(items),
      });
    } catch (e) {
      client.fail("audio", `This browser could not start audio: ${(e as Error).message}`);
      return;
    }
    audioRef.current = session;
    lastAudio.current = session;
    setMicrophone(microphone);
    setAudio(session);
    client.setPlayer(session);
    if (resume) client.retry();
    else client.start();
    session.start({ microphone, voiceProcessing, onAudio: (pcm) => client.appendAudio(pcm) }).catch((e: unknown) => {
      if (audioRef.current !== session) return; // the call already ended (and its audio was closed)
      if (e instanceof MicrophoneError) client.fail(e.kind, e.message);
      else client.fail("audio", `Audio could not start: ${(e as Error)?.message ?? e}`);
    });
  };

  const endCall = async () => {
    await client.stop();
    closeAudio();
  };

  /** Both leave the page (for the hosted UI): end the call first, so the server sees it end. */
  const beginSignIn = async () => {
    if (signIn === null) return;
    if (client.getSnapshot().phase !== "idle") await endCall();
    const { pathname, search, hash } = window.location;
    await signIn.begin(`${pathname}${search}${hash}`);
  };
  const signOut = async () => {
    if (signIn === null) return;
    if (client.getSnapshot().phase !== "idle") await endCall();
    await signIn.signOut();
  };

  const inCall = !["idle", "error"].includes(snap.phase);
  const connected = ["listening", "thinking", "speaking"].includes(snap.phase);
  const voices = snap.voices.length ? snap.voices : preview.voices;
  const defaultVoice = snap.defaultVoice ?? preview.defaultVoice;
  const randomWeights = snap.randomWeights ?? preview.randomWeights;
  const selectedVoice = snap.voice ?? defaultVoice ?? "";
  // The orb follows whoever talks: the reply while it plays, else the microphone (silent without one).
  const orbAnalyser = audio === null ? null : snap.phase === "speaking" ? audio.outputAnalyser : audio.inputAnalyser;

  return (
    <div className="app" data-phase={snap.phase}>
      <header className="topbar">
        <div className="brand">
          <span className="brand-mark" aria-hidden="true" />
          <h1>CSM</h1>
          <span className="brand-sub">voice conversation</span>
        </div>
        <div className="topbar-actions">
          {auth !== null ? <SignInControl state={auth} onSignIn={() => void beginSignIn()} onSignOut={() => void signOut()} /> : null}
          <button type="button" className="quiet" onClick={() => setSettingsOpen(true)} aria-haspopup="dialog">
            Settings
          </button>
        </div>
      </header>

      {auth?.message ? (
        <div className="banner" role="alert" data-testid="sign-in-message">
          {auth.message}
        </div>
      ) : null}

      {randomWeights ? (
        <div className="banner" role="note" data-testid="random-weights">
          <strong>Random weights.</strong> This server runs an untrained model: its replies are noise, not words.
          Point <code>MODEL_PATH</code> at CSM-1B for speech.
        </div>
      ) : null}

      <main className="main">
        {snap.failure !== null ? (
          <FailureScreen
            failure={snap.failure}
            endpoint={resolved.endpoint}
            onRetry={() => {
              const micFailed = snap.failure?.kind === "mic-denied" || snap.failure?.kind === "mic-missing";
              startCall(micFailed || microphone, true);
            }}
            onTypeInstead={() => startCall(false, true)}
            onSettings={() => setSettingsOpen(true)}
            onDismiss={() => client.dismissFailure()}
            signIn={auth === null ? null : { signedIn: auth.status === "signed-in", onSignIn: () => void beginSignIn() }}
          />
        ) : (
          <section className="stage" aria-label="Conversation controls">
            <Orb
              phase={snap.phase}
              inCall={inCall}
              disabled={fileConfig === undefined || auth?.status === "signing-in"}
              analyser={orbAnalyser}
              onToggle={() => (inCall ? void endCall() : startCall(true, false))}
            />
            <p className="status" role="status" aria-live="polite" data-testid="status" data-phase={snap.phase}>
              {status}
            </p>
            <div className="meters">
              <Visualizer label="You" analyser={microphone ? (audio?.inputAnalyser ?? null) : null} active={snap.userSpeaking} />
              <Visualizer label="CSM" analyser={audio?.outputAnalyser ?? null} active={snap.phase === "speaking"} />
            </div>
            <p className="latency" data-testid="latency">
              <span className="latency-label">Response time</span>{" "}
              {snap.latencyMs === null ? (
                <span className="latency-value">—</span>
              ) : (
                <>
                  <span className="latency-value">{formatSeconds(snap.latencyMs)}</span>
                  {snap.latencies.length > 1 ? (
                    <span className="latency-extra">
                      {" "}
                      (median {formatSeconds(median(snap.latencies))} over {snap.latencies.length} replies)
                    </span>
                  ) : null}
                </>
              )}
              <span className="visually-hidden"> from the end of your turn to the first audio of the reply</span>
            </p>
          </section>
        )}

        <section className="controls" aria-label="Conversation options">
          <Composer enabled={connected} onSend={(text) => client.sendText(text)} />
          <div className="options">
            <label className="field">
              <span>Voice</span>
              <select
                value={selectedVoice}
                disabled={voices.length === 0}
                onChange={(e) => {
                  const v = e.target.value;
                  storage()?.setItem(VOICE_KEY, v);
                  client.setVoice(v);
                }}
              >
                {voices.length === 0 ? <option value="">Known once connected</option> : null}
                {voices.map((v) => (
                  <option key={v} value={v}>
                    {voiceLabel(v, defaultVoice)}
                  </option>
                ))}
              </select>
            </label>
            <label className="toggle">
              <input
                type="checkbox"
                role="switch"
                checked={showTranscript}
                onChange={(e) => {
                  setShowTranscript(e.target.checked);
                  storage()?.setItem(TRANSCRIPT_KEY, e.target.checked ? "on" : "off");
                }}
              />
              <span>Show transcript</span>
            </label>
          </div>
          {showTranscript ? <Transcript entries={snap.transcript} /> : null}
        </section>
      </main>

      <div className="notice-area" role="status" aria-live="polite">
        {snap.notice !== null ? (
          <div className="notice" data-code={snap.notice.code}>
            <span>{snap.notice.message}</span>
            <button type="button" className="quiet" onClick={() => client.dismissNotice(snap.notice!.id)} aria-label="Dismiss message">
              ×
            </button>
          </div>
        ) : null}
      </div>

      <footer className="footer">
        <span>
          Server: <code>{resolved.endpoint.replace(/\?.*$/, "")}</code>
        </span>
        {!voiceProcessing ? <span> · voice processing off</span> : null}
        {fileConfig !== undefined && resolved.rejected.length > 0 ? (
          <span className="warning">
            {" "}
            · ignored an unusable endpoint ({resolved.rejected[0].endpoint}); see Settings
          </span>
        ) : null}
      </footer>

      <SettingsDialog
        open={settingsOpen}
        resolved={resolved}
        saved={saved}
        defaultEndpoint={defaultEndpoint(window.location)}
        voiceProcessing={voiceProcessing}
        onVoiceProcessing={setVoiceProcessing}
        onSave={(s) => {
          saveSettings(storage(), s);
          setSaved(loadSaved(storage()));
        }}
        onClose={() => setSettingsOpen(false)}
      />
    </div>
  );
}
