/**
 * What the page shows of a conversation, as a pure reducer: `reduceView(state, event)` returns the next
 * state and never touches a socket, a timer or the player. Its events are the server's own (the person's
 * turn, the reply's words, errors, the server's info) plus the page's (`ViewEvent`); the turn tracker
 * has already left out what belongs to an interrupted reply. `phaseOf` names the state the person sees
 * from this, the connection's status and the turn's activity.
 */

import type { ServerEvent } from "./protocol";

export type Phase = "idle" | "connecting" | "listening" | "thinking" | "speaking" | "reconnecting" | "error";
export type FailureKind = "server-down" | "auth" | "busy" | "mic-denied" | "mic-missing" | "audio";

export interface Failure {
  kind: FailureKind;
  message: string;
}

export interface Notice {
  id: number;
  code: string;
  message: string;
}

export interface TranscriptEntry {
  id: string;
  role: "user" | "assistant";
  text: string;
  status: "pending" | "streaming" | "done" | "interrupted" | "failed";
  typed?: boolean;
}

export interface ViewState {
  failure: Failure | null;
  userSpeaking: boolean;
  transcript: readonly TranscriptEntry[];
  voices: readonly string[];
  /** The voice the person picked, or null for the server's default. */
  voice: string | null;
  defaultVoice: string | null;
  randomWeights: boolean | null;
  maxReplySeconds: number | null;
  /** Response times of the last 20 replies, oldest first. */
  latencies: readonly number[];
  notice: Notice | null;
  /** Notices shown so far: each one's id is new, so dismissing an old one never hides a newer one. */
  noticeSeq: number;
}

/** What happens on the page's side. */
export type PageEvent =
  | { type: "call.started"; resume: boolean } // a new conversation starts with an empty transcript
  | { type: "call.failed"; failure: Failure }
  | { type: "failure.dismissed" }
  | { type: "turn.reset" } // the call ended or its socket closed: nobody is heard speaking any more
  | { type: "notice"; code: string; message: string }
  | { type: "notice.dismissed"; id: number }
  | { type: "voice.chosen"; voice: string | null }
  | { type: "user.typed"; id: string; text: string }
  | { type: "reply.heard"; latencyMs: number } // the reply's first audio reached the ears
  /** A reply line's end: "done" only ends a line still streaming; the others mark it whatever it was. */
  | { type: "reply.status"; itemId: string; status: "done" | "interrupted" | "failed" };

export type ViewEvent = ServerEvent | PageEvent;

/** The connection's part of the phase. */
export type ConnectionStatus = "idle" | "connecting" | "reconnecting" | "open";
/** The turn tracker's part of the phase: a reply playing, or one being waited for. */
export type TurnActivity = "quiet" | "thinking" | "speaking";

const LATENCIES_KEPT = 20;

export function initialView(voice: string | null): ViewState {
  return {
    failure: null,
    userSpeaking: false,
    transcript: [],
    voices: [],
    voice,
    defaultVoice: null,
    randomWeights: null,
    maxReplySeconds: null,
    latencies: [],
    notice: null,
    noticeSeq: 0,
  };
}

export function reduceView(state: ViewState, event: ViewEvent): ViewState {
  switch (event.type) {
    case "call.started":
      return { ...state, failure: null, userSpeaking: false, ...(event.resume ? {} : { transcript: [], latencies: [] }) };
    case "call.failed":
      return { ...state, failure: event.failure, userSpeaking: false };
    case "failure.dismissed":
      return { ...state, failure: null };
    case "turn.reset":
      return { ...state, userSpeaking: false };
    case "notice":
    case "error": {
      const { code, message } = event.type === "error" ? event.error : event;
      return { ...state, notice: { id: state.noticeSeq + 1, code, message }, noticeSeq: state.noticeSeq + 1 };
    }
    case "notice.dismissed":
      return state.notice?.id === event.id ? { ...state, notice: null } : state;
    case "voice.chosen":
      return { ...state, voice: event.voice };
    case "user.typed":
      return { ...state, transcript: [...state.transcript, { id: event.id, role: "user", text: event.text, status: "done", typed: true }] };
    case "reply.heard":
      return { ...state, latencies: [...state.latencies.slice(1 - LATENCIES_KEPT), event.latencyMs] };
    case "reply.status":
      if (event.status === "done" && entry(state, event.itemId)?.status !== "streaming") return state;
      return update(state, event.itemId, { status: event.status });
    case "x-server.info": {
      const voice = state.voice !== null && !event.voices.includes(state.voice) ? null : state.voice;
      return {
        ...state,
        voices: event.voices,
        voice,
        defaultVoice: event.default_voice,
        randomWeights: event.random_weights,
        maxReplySeconds: event.max_reply_seconds,
      };
    }
    case "input_audio_buffer.speech_started":
      return { ...upsert(state, { id: event.item_id, role: "user", text: "", status: "pending" }), userSpeaking: true };
    case "input_audio_buffer.speech_stopped":
      return { ...state, userSpeaking: false };
    case "input_audio_buffer.committed": {
      const next = { ...state, userSpeaking: false };
      return entry(state, event.item_id) ? next : upsert(next, { id: event.item_id, role: "user", text: "", status: "pending" });
    }
    case "conversation.item.input_audio_transcription.delta": {
      // Words heard while the person speaks; `completed` replaces them with the final transcript.
      const heard = entry(state, event.item_id);
      if (heard?.status === "done") return state;
      return upsert(state, { id: event.item_id, role: "user", text: (heard?.text ?? "") + event.delta, status: "pending" });
    }
    case "conversation.item.input_audio_transcription.completed":
      return upsert(state, { id: event.item_id, role: "user", text: event.transcript.trim(), status: "done" });
    case "response.output_item.added":
      return upsert(state, { id: event.item.id, role: "assistant", text: "", status: "streaming" });
    case "response.output_audio_transcript.delta": {
      const text = (entry(state, event.item_id)?.text ?? "") + event.delta;
      return upsert(state, { id: event.item_id, role: "assistant", text, status: "streaming" });
    }
    case "response.output_audio_transcript.done":
      return update(state, event.item_id, { text: event.transcript });
    default:
      return state;
  }
}

export function phaseOf(state: ViewState, connection: ConnectionStatus, turn: TurnActivity): Phase {
  if (state.failure !== null) return "error";
  if (connection !== "open") return connection;
  if (turn === "speaking") return "speaking";
  if (state.userSpeaking) return "listening";
  // A reply being made, or received and waiting for its pre-roll, is still "thinking" to the person.
  return turn === "thinking" ? "thinking" : "listening";
}

function entry(state: ViewState, id: string): TranscriptEntry | undefined {
  return state.transcript.find((e) => e.id === id);
}

/** Add the line, or merge it into the one with its id; an interrupted reply keeps what it showed. */
function upsert(state: ViewState, line: TranscriptEntry): ViewState {
  const i = state.transcript.findIndex((e) => e.id === line.id);
  if (i < 0) return { ...state, transcript: [...state.transcript, line] };
  if (state.transcript[i].status === "interrupted" && line.role !== "user") return state;
  return { ...state, transcript: state.transcript.map((e, k) => (k === i ? { ...e, ...line, typed: e.typed } : e)) };
}

function update(state: ViewState, id: string, patch: Partial<TranscriptEntry>): ViewState {
  if (!entry(state, id)) return state;
  return { ...state, transcript: state.transcript.map((e) => (e.id === id ? { ...e, ...patch } : e)) };
}
