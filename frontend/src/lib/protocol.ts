/**
 * The realtime protocol as the page uses it: a subset of the OpenAI Realtime API (GA event names),
 * JSON text frames, audio as base64 PCM16 mono 24 kHz. `serve_app/protocol.py` is the authority; only
 * the fields the page reads or writes are typed here.
 */

export type ServerEvent =
  | { type: "session.created" | "session.updated"; session: { audio?: { output?: { voice?: string } } } }
  | {
      type: "x-server.info";
      voices: string[];
      default_voice: string;
      random_weights: boolean;
      max_reply_seconds: number;
      conversation_id?: string;
    }
  | { type: "input_audio_buffer.speech_started"; item_id: string; audio_start_ms: number }
  | { type: "input_audio_buffer.speech_stopped"; item_id: string; audio_end_ms: number }
  | { type: "input_audio_buffer.committed"; item_id: string }
  | { type: "input_audio_buffer.cleared" }
  | { type: "conversation.item.input_audio_transcription.delta"; item_id: string; delta: string }
  | { type: "conversation.item.input_audio_transcription.completed"; item_id: string; transcript: string }
  | { type: "conversation.item.added" | "conversation.item.done"; item: { id: string; role: string } }
  | { type: "conversation.item.truncated"; item_id: string; audio_end_ms: number }
  | { type: "response.created"; response: { id: string } }
  | { type: "response.output_item.added" | "response.output_item.done"; response_id: string; item: { id: string } }
  | { type: "response.output_audio.delta"; response_id: string; item_id: string; delta: string }
  | { type: "response.output_audio.done"; response_id: string; item_id: string }
  | { type: "response.output_audio_transcript.delta"; response_id: string; item_id: string; delta: string }
  | { type: "response.output_audio_transcript.done"; response_id: string; item_id: string; transcript: string }
  | {
      type: "response.done";
      response: {
        id: string;
        status: "completed" | "cancelled" | "failed" | "incomplete" | "in_progress";
        status_details?: { type?: string; reason?: string | null; error?: { code?: string | null; message?: string | null } | null } | null;
      };
    }
  | { type: "error"; error: { type: string; code: string; message: string; param?: string | null } };

export type ServerEventType = ServerEvent["type"];

export type ClientEvent =
  | { type: "session.update"; session: Record<string, unknown> }
  | { type: "input_audio_buffer.append"; audio: string }
  | { type: "input_audio_buffer.commit" }
  | { type: "input_audio_buffer.clear" }
  | {
      type: "conversation.item.create";
      item: { id?: string; type: "message"; role: "user"; content: { type: "input_text"; text: string }[] };
    }
  | { type: "conversation.item.truncate"; item_id: string; content_index: number; audio_end_ms: number }
  | { type: "response.create" }
  | { type: "response.cancel"; response_id?: string };

/**
 * Our extension on every client event: its number on this socket (1, 2, ...). Through API Gateway two
 * events may reach the server in either order; it applies them in this one (serve_app/ordering.py).
 */
export const SEQ_FIELD = "x-seq";

/** WebSocket close codes the page treats specially. */
export const CLOSE_NORMAL = 1000;
export const CLOSE_POLICY = 1008; // a wrong token (or a bad conversation id): never retried
export const CLOSE_TRY_AGAIN_LATER = 1013; // server busy
export const CLOSE_TAKEN_OVER = 4001; // the conversation was opened on a newer connection: never retried

export const WIRE_RATE = 24_000;
