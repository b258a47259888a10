import { StrictMode } from "react";
import { createRoot } from "react-dom/client";
import { App, sessionStore } from "./App";
import { takeCallback } from "./lib/signIn";
import "./styles.css";

// Back from the sign-in page (`?code=&state=`): out of the address before anything reads it, with the
// address sign-in began from put back. Done once, here, so the code is exchanged exactly once.
const signInReturn = takeCallback(window.location.href, sessionStore());
if (signInReturn !== null) window.history.replaceState(window.history.state, "", signInReturn.address);

createRoot(document.getElementById("root")!).render(
  <StrictMode>
    <App signInCallback={signInReturn?.callback ?? null} />
  </StrictMode>,
);
