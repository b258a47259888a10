import { useEffect, useRef } from "react";
import type { Failure } from "../lib/viewState";

interface Props {
  failure: Failure;
  endpoint: string;
  onRetry: () => void;
  onTypeInstead: () => void;
  onSettings: () => void;
  onDismiss: () => void;
  /** config.json has `auth`: an auth failure is answered by signing in. */
  signIn?: { signedIn: boolean; onSignIn: () => void } | null;
}

const TITLES: Record<Failure["kind"], string> = {
  "mic-denied": "Microphone blocked",
  "mic-missing": "No microphone",
  "server-down": "Can't reach the server",
  auth: "Access denied",
  busy: "The server is busy",
  audio: "Audio couldn't start",
};

/** What went wrong, in words, and the ways on; focus moves here so a screen reader hears it at once. */
export function FailureScreen({ failure, endpoint, onRetry, onTypeInstead, onSettings, onDismiss, signIn = null }: Props) {
  const heading = useRef<HTMLHeadingElement>(null);
  useEffect(() => heading.current?.focus(), [failure]);
  const mic = failure.kind === "mic-denied" || failure.kind === "mic-missing";
  const needsSignIn = failure.kind === "auth" && signIn !== null;
  return (
    <section className="failure" role="alert" aria-labelledby="failure-title" data-failure={failure.kind} data-needs-sign-in={needsSignIn || undefined}>
      <h2 id="failure-title" ref={heading} tabIndex={-1}>
        {needsSignIn ? (signIn.signedIn ? "Sign in again" : "Sign in to talk") : TITLES[failure.kind]}
      </h2>
      {needsSignIn ? (
        <p>
          {signIn.signedIn
            ? "The server refused your sign-in. Sign in again to go on."
            : "This server lets in only people who are signed in."}
        </p>
      ) : (
        <p>{failure.message}</p>
      )}
      {failure.kind === "mic-denied" ? (
        <p>
          CSM needs your microphone to hear you. Allow microphone access for this site (the icon in the address bar),
          then try again — or type your turns instead.
        </p>
      ) : null}
      {failure.kind === "mic-missing" ? <p>Connect a microphone and try again, or type your turns instead.</p> : null}
      {failure.kind === "server-down" ? (
        <p>
          The page tried several times to reach <code>{endpoint}</code>. The server may be starting or down, or the
          endpoint or token may be wrong.
        </p>
      ) : null}
      {failure.kind === "auth" && !needsSignIn ? <p>Check the access token in the connection settings.</p> : null}
      <div className="failure-actions">
        {needsSignIn ? (
          <button type="button" className="primary" onClick={signIn.onSignIn}>
            Sign in
          </button>
        ) : null}
        <button type="button" className={needsSignIn ? undefined : "primary"} onClick={onRetry}>
          Try again
        </button>
        {mic ? (
          <button type="button" onClick={onTypeInstead}>
            Type instead
          </button>
        ) : (
          <button type="button" onClick={onSettings}>
            Connection settings
          </button>
        )}
        <button type="button" className="quiet" onClick={onDismiss}>
          Close
        </button>
      </div>
    </section>
  );
}
