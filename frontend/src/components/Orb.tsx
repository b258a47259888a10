import { useCallback, useRef } from "react";
import type { Phase } from "../lib/viewState";
import { levelOf, useAnalyserLoop } from "./useAnalyser";

interface OrbProps {
  phase: Phase;
  inCall: boolean;
  disabled: boolean;
  /** The side whose loudness the orb shows: the reply while speaking, else the person. */
  analyser: AnalyserNode | null;
  onToggle: () => void;
}

/** The one big control: starts the call, ends it; it breathes with whoever is talking. */
export function Orb({ phase, inCall, disabled, analyser, onToggle }: OrbProps) {
  const ref = useRef<HTMLButtonElement>(null);
  const smooth = useRef(0);
  const draw = useCallback((node: AnalyserNode | null) => {
    const level = node === null ? 0 : levelOf(node);
    smooth.current = Math.max(level, smooth.current * 0.85);
    ref.current?.style.setProperty("--level", smooth.current.toFixed(3));
  }, []);
  useAnalyserLoop(analyser, draw);
  return (
    <button
      ref={ref}
      type="button"
      className="orb"
      data-phase={phase}
      aria-label={inCall ? "End conversation" : "Start conversation"}
      disabled={disabled}
      onClick={onToggle}
    >
      <span className="orb-ring" aria-hidden="true" />
      <span className="orb-core" aria-hidden="true" />
      <span className="orb-label" aria-hidden="true">
        {inCall ? "End" : "Start"}
      </span>
    </button>
  );
}
