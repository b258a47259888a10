import { useEffect } from "react";

const reducedMotion = () => typeof matchMedia === "function" && matchMedia("(prefers-reduced-motion: reduce)").matches;

/**
 * Run `draw(analyser)` on animation frames, at most `fps` times a second, while `analyser` is set (and
 * the tab is visible). 30 fps is smooth for levels and leaves the CPU to the audio; with reduced motion
 * asked for, 4 updates a second are enough to show who is talking.
 */
export function useAnalyserLoop(analyser: AnalyserNode | null, draw: (analyser: AnalyserNode | null) => void, fps = 30): void {
  useEffect(() => {
    if (analyser === null) {
      draw(null);
      return;
    }
    const interval = 1000 / (reducedMotion() ? 4 : fps) - 2;
    let frame = 0;
    let last = 0;
    const tick = (now: number) => {
      if (now - last >= interval) {
        last = now;
        draw(analyser);
      }
      frame = requestAnimationFrame(tick);
    };
    frame = requestAnimationFrame(tick);
    return () => cancelAnimationFrame(frame);
  }, [analyser, draw, fps]); // `draw` should be stable (useCallback writing to refs)
}

const scratch = new WeakMap<AnalyserNode, Float32Array<ArrayBuffer>>();

/** RMS level of the analyser's current waveform, mapped to 0..1 on a loudness-like curve. */
export function levelOf(analyser: AnalyserNode): number {
  let buf = scratch.get(analyser);
  if (buf === undefined || buf.length !== analyser.fftSize) {
    buf = new Float32Array(analyser.fftSize);
    scratch.set(analyser, buf);
  }
  analyser.getFloatTimeDomainData(buf);
  let sum = 0;
  for (let i = 0; i < buf.length; i++) sum += buf[i] * buf[i];
  const rms = Math.sqrt(sum / buf.length);
  const db = 20 * Math.log10(rms + 1e-9); // -180..0
  return Math.min(1, Math.max(0, (db + 60) / 50)); // -60 dB → 0, -10 dB → 1
}
