import { type FormEvent, useState } from "react";

/** Type a turn instead of speaking it; Enter sends. */
export function Composer({ enabled, onSend }: { enabled: boolean; onSend: (text: string) => Promise<boolean> }) {
  const [text, setText] = useState("");
  const submit = async (e: FormEvent) => {
    e.preventDefault();
    if (!text.trim()) return;
    const sent = await onSend(text);
    if (sent) setText("");
  };
  return (
    <form className="composer" onSubmit={submit}>
      <label htmlFor="composer-text" className="visually-hidden">
        Type a message
      </label>
      <input
        id="composer-text"
        type="text"
        autoComplete="off"
        maxLength={2000}
        placeholder={enabled ? "Type a message instead of speaking…" : "Start a conversation to type a message"}
        value={text}
        onChange={(e) => setText(e.target.value)}
        disabled={!enabled}
      />
      <button type="submit" disabled={!enabled || !text.trim()}>
        Send
      </button>
    </form>
  );
}
