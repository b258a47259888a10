import { useEffect, useRef } from "react";
import type { TranscriptEntry } from "../lib/viewState";

const STATUS_NOTE: Partial<Record<TranscriptEntry["status"], string>> = {
  interrupted: "interrupted",
  failed: "failed",
};

/** The live transcript: the person's turns (ASR or typed) and the replies' text, newest last. */
export function Transcript({ entries }: { entries: readonly TranscriptEntry[] }) {
  const list = useRef<HTMLOListElement>(null);
  useEffect(() => {
    const el = list.current;
    if (el) el.scrollTop = el.scrollHeight;
  }, [entries]);
  return (
    <section className="transcript" aria-labelledby="transcript-title">
      <h2 id="transcript-title" className="visually-hidden">
        Transcript
      </h2>
      {entries.length === 0 ? (
        <p className="transcript-empty">What you and CSM say will appear here.</p>
      ) : null}
      <ol ref={list} role="log" aria-live="polite" aria-relevant="additions text" data-testid="transcript">
        {entries.map((e) => (
          <li key={e.id} className={`turn turn-${e.role}`} data-role={e.role} data-status={e.status} data-item-id={e.id}>
            <span className="turn-who">{e.role === "user" ? (e.typed ? "You (typed)" : "You") : "CSM"}</span>
            <p className="turn-text">
              {e.text || (e.status === "pending" ? "…" : e.role === "user" ? "(nothing recognised)" : "…")}
              {STATUS_NOTE[e.status] ? <span className="turn-note"> — {STATUS_NOTE[e.status]}</span> : null}
            </p>
          </li>
        ))}
      </ol>
    </section>
  );
}
