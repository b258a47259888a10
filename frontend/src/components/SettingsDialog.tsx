import { type FormEvent, useEffect, useRef, useState } from "react";
import { acceptEndpoint, type EndpointSettings, type ResolvedSettings, type SettingSource } from "../lib/config";

interface Props {
  open: boolean;
  resolved: ResolvedSettings;
  saved: EndpointSettings | null;
  defaultEndpoint: string;
  voiceProcessing: boolean;
  onVoiceProcessing: (on: boolean) => void;
  onSave: (settings: EndpointSettings) => void;
  onClose: () => void;
}

const SOURCE: Record<SettingSource, string> = {
  query: "from the page address",
  saved: "saved in this browser",
  config: "from config.json",
  default: "default",
};

/** Why the page would refuse this endpoint (see config.ts), or null: empty means the default. */
function endpointProblem(endpoint: string, listed: readonly string[]): string | null {
  if (endpoint.trim() === "") return null;
  try {
    acceptEndpoint(endpoint.trim(), window.location, listed);
    return null;
  } catch (e) {
    return (e as Error).message;
  }
}

/** Endpoint and token (saved in localStorage), and the microphone's voice processing. */
export function SettingsDialog(props: Props) {
  const { open, resolved, saved, defaultEndpoint, onClose } = props;
  const dialog = useRef<HTMLDialogElement>(null);
  const [endpoint, setEndpoint] = useState(saved?.endpoint ?? "");
  const [token, setToken] = useState(saved?.token ?? "");
  const [problem, setProblem] = useState<string | null>(null);

  useEffect(() => {
    const el = dialog.current;
    if (!el) return;
    if (open && !el.open) {
      setEndpoint(saved?.endpoint ?? "");
      setToken(saved?.token ?? "");
      setProblem(null);
      el.showModal();
    } else if (!open && el.open) el.close();
  }, [open, saved]);

  const submit = (e: FormEvent) => {
    e.preventDefault();
    // Saved, it would only be ignored on the next load: say so now, while the person is here.
    const refused = endpointProblem(endpoint, resolved.listed);
    setProblem(refused);
    if (refused !== null) return;
    props.onSave({ endpoint, token });
    onClose();
  };

  return (
    <dialog ref={dialog} className="settings" aria-labelledby="settings-title" onClose={onClose}>
      <form onSubmit={submit}>
        <h2 id="settings-title">Connection settings</h2>
        <p className="hint">
          In use: <code>{resolved.endpoint}</code> ({SOURCE[resolved.endpointSource]})
          {resolved.token ? `, with a token (${SOURCE[resolved.tokenSource]})` : ", no token"}. The page address
          (<code>?endpoint=</code>, <code>#token=</code>) overrides what is saved here; a token in it is saved and
          removed from the address.
        </p>
        {resolved.rejected.map((r) => (
          <p key={`${r.source}:${r.endpoint}`} className="hint warning" role="alert">
            Ignored the endpoint {SOURCE[r.source]}: {r.reason}.
          </p>
        ))}
        <label htmlFor="settings-endpoint">Endpoint</label>
        <input
          id="settings-endpoint"
          type="url"
          inputMode="url"
          placeholder={defaultEndpoint}
          value={endpoint}
          onChange={(e) => setEndpoint(e.target.value)}
          aria-describedby="settings-endpoint-help"
          aria-invalid={problem !== null}
        />
        {problem !== null ? (
          <p className="hint warning" role="alert">
            Not saved: {problem}.
          </p>
        ) : null}
        <p id="settings-endpoint-help" className="hint">
          This server's <code>/v1/realtime</code> when empty. The page connects only to this server
          {resolved.listed.length > 0 ? (
            <>
              {" "}or to an endpoint config.json lists:{" "}
              {resolved.listed.map((l, i) => (
                <span key={l}>
                  {i > 0 ? ", " : ""}
                  <code>{l}</code>
                </span>
              ))}
            </>
          ) : null}
          . Changes apply to the next conversation.
        </p>
        <label htmlFor="settings-token">Access token</label>
        <input id="settings-token" type="password" autoComplete="off" value={token} onChange={(e) => setToken(e.target.value)} />
        <label className="check">
          <input type="checkbox" checked={props.voiceProcessing} onChange={(e) => props.onVoiceProcessing(e.target.checked)} />
          Echo cancellation, noise suppression and gain control (applies to the next conversation)
        </label>
        <div className="settings-actions">
          <button type="button" className="quiet" onClick={() => { setEndpoint(""); setToken(""); }}>
            Clear
          </button>
          <button type="button" onClick={onClose}>
            Cancel
          </button>
          <button type="submit" className="primary">
            Save
          </button>
        </div>
      </form>
    </dialog>
  );
}
