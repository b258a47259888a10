import type { SignInSnapshot } from "../lib/signIn";

interface Props {
  state: SignInSnapshot;
  onSignIn: () => void;
  onSignOut: () => void;
}

/** The top bar's sign-in: who is signed in and "Sign out", or "Sign in" (config.json has `auth`). */
export function SignInControl({ state, onSignIn, onSignOut }: Props) {
  if (state.status === "signed-in") {
    return (
      <div className="sign-in" data-testid="sign-in" data-status={state.status}>
        <span className="signed-in-as">
          Signed in{state.username ? <> as <strong>{state.username}</strong></> : null}
        </span>
        <button type="button" className="quiet" onClick={onSignOut}>
          Sign out
        </button>
      </div>
    );
  }
  return (
    <div className="sign-in" data-testid="sign-in" data-status={state.status}>
      <button type="button" className="primary" onClick={onSignIn} disabled={state.status === "signing-in"}>
        {state.status === "signing-in" ? "Signing in…" : state.status === "expired" ? "Sign in again" : "Sign in"}
      </button>
    </div>
  );
}
