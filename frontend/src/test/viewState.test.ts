import { describe, expect, it } from "vitest";
import { initialView, phaseOf, reduceView, type ViewEvent, type ViewState } from "../lib/viewState";

const reduce = (events: ViewEvent[], state: ViewState = initialView(null)): ViewState => events.reduce(reduceView, state);

describe("reduceView: the transcript", () => {
  it("shows the words heard while the person speaks, then the final transcript", () => {
    const delta = (text: string): ViewEvent => ({ type: "conversation.item.input_audio_transcription.delta", item_id: "item_u", delta: text });
    let state = reduce([{ type: "input_audio_buffer.speech_started", item_id: "item_u", audio_start_ms: 0 }, delta("what is")]);
    expect(state.transcript).toEqual([{ id: "item_u", role: "user", text: "what is", status: "pending" }]);
    state = reduce([delta(" the weather")], state);
    expect(state.transcript[0].text).toBe("what is the weather");
    state = reduce(
      [
        { type: "input_audio_buffer.speech_stopped", item_id: "item_u", audio_end_ms: 1500 },
        { type: "conversation.item.input_audio_transcription.completed", item_id: "item_u", transcript: "what is the weather like" },
      ],
      state,
    );
    expect(state.transcript[0]).toMatchObject({ text: "what is the weather like", status: "done" });
    state = reduce([delta(" late")], state); // a delta after the final transcript changes nothing
    expect(state.transcript[0].text).toBe("what is the weather like");
  });

  it("a commit without speech_started still gets its line, once", () => {
    const commit: ViewEvent = { type: "input_audio_buffer.committed", item_id: "item_u" };
    const state = reduce([commit, commit]);
    expect(state.transcript).toEqual([{ id: "item_u", role: "user", text: "", status: "pending" }]);
  });

  it("builds the reply's line from its words, and ends it", () => {
    const state = reduce([
      { type: "response.output_item.added", response_id: "resp_1", item: { id: "item_r" } },
      { type: "response.output_audio_transcript.delta", response_id: "resp_1", item_id: "item_r", delta: "You said:" },
      { type: "response.output_audio_transcript.delta", response_id: "resp_1", item_id: "item_r", delta: " hi." },
    ]);
    expect(state.transcript).toEqual([{ id: "item_r", role: "assistant", text: "You said: hi.", status: "streaming", typed: undefined }]);
    const done = reduce(
      [
        { type: "response.output_audio_transcript.done", response_id: "resp_1", item_id: "item_r", transcript: "You said: hi!" },
        { type: "reply.status", itemId: "item_r", status: "done" },
      ],
      state,
    );
    expect(done.transcript[0]).toMatchObject({ text: "You said: hi!", status: "done" });
  });

  it("an interrupted reply keeps what it showed; only a line still streaming becomes done", () => {
    let state = reduce([
      { type: "response.output_item.added", response_id: "resp_1", item: { id: "item_r" } },
      { type: "reply.status", itemId: "item_r", status: "interrupted" },
      { type: "response.output_audio_transcript.delta", response_id: "resp_1", item_id: "item_r", delta: "late words" },
      { type: "reply.status", itemId: "item_r", status: "done" },
    ]);
    expect(state.transcript[0]).toMatchObject({ text: "", status: "interrupted" });
    state = reduce([{ type: "reply.status", itemId: "item_gone", status: "failed" }], state);
    expect(state.transcript).toHaveLength(1); // no line of its own: nothing to mark
  });

  it("a typed turn is a finished line of its own", () => {
    const state = reduce([{ type: "user.typed", id: "item_1", text: "hi there" }]);
    expect(state.transcript).toEqual([{ id: "item_1", role: "user", text: "hi there", status: "done", typed: true }]);
  });

  it("a new call starts empty and without a failure; a resumed one keeps its transcript", () => {
    const before = reduce([
      { type: "user.typed", id: "item_1", text: "hi" },
      { type: "reply.heard", latencyMs: 400 },
      { type: "call.failed", failure: { kind: "server-down", message: "down" } },
    ]);
    const resumed = reduce([{ type: "call.started", resume: true }], before);
    expect(resumed).toMatchObject({ failure: null, latencies: [400] });
    expect(resumed.transcript).toHaveLength(1);
    const fresh = reduce([{ type: "call.started", resume: false }], before);
    expect(fresh).toMatchObject({ failure: null, latencies: [], transcript: [] });
  });
});

describe("reduceView: what else the page shows", () => {
  it("keeps the last 20 response times", () => {
    const heard = Array.from({ length: 25 }, (_, k): ViewEvent => ({ type: "reply.heard", latencyMs: k }));
    expect(reduce(heard).latencies).toEqual(Array.from({ length: 20 }, (_, k) => k + 5));
  });

  it("gives each notice a new id, from errors too; dismissing an old one keeps the newer", () => {
    let state = reduce([{ type: "notice", code: "closed", message: "bye" }]);
    expect(state.notice).toEqual({ id: 1, code: "closed", message: "bye" });
    state = reduce([{ type: "notice.dismissed", id: 1 }], state);
    expect(state.notice).toBeNull();
    state = reduce([{ type: "error", error: { type: "invalid_request_error", code: "rate_limited", message: "slow down" } }], state);
    expect(state.notice).toEqual({ id: 2, code: "rate_limited", message: "slow down" });
    expect(reduce([{ type: "notice.dismissed", id: 1 }], state).notice?.id).toBe(2);
  });

  it("takes the server's info, forgetting a chosen voice it does not have", () => {
    const info: ViewEvent = { type: "x-server.info", voices: ["none", "narrator"], default_voice: "none", random_weights: false, max_reply_seconds: 6 };
    expect(reduce([info], initialView("narrator"))).toMatchObject({ voice: "narrator", defaultVoice: "none", randomWeights: false, maxReplySeconds: 6 });
    expect(reduce([info], initialView("gone")).voice).toBeNull();
  });
});

describe("phaseOf", () => {
  const quiet = initialView(null);
  const speaking = reduce([{ type: "input_audio_buffer.speech_started", item_id: "item_u", audio_start_ms: 0 }]);
  const failed = reduce([{ type: "call.failed", failure: { kind: "auth", message: "no" } }]);

  it("puts a failure first, then the connection's status", () => {
    expect(phaseOf(failed, "open", "speaking")).toBe("error");
    expect(phaseOf(quiet, "idle", "quiet")).toBe("idle");
    expect(phaseOf(quiet, "reconnecting", "thinking")).toBe("reconnecting");
    expect(phaseOf(quiet, "connecting", "quiet")).toBe("connecting");
  });

  it("once open: the reply playing, else the person speaking, else a reply awaited", () => {
    expect(phaseOf(speaking, "open", "speaking")).toBe("speaking");
    expect(phaseOf(speaking, "open", "thinking")).toBe("listening");
    expect(phaseOf(quiet, "open", "thinking")).toBe("thinking");
    expect(phaseOf(quiet, "open", "quiet")).toBe("listening");
  });
});
