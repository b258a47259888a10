import { useCallback, useRef } from "react";
import { useAnalyserLoop } from "./useAnalyser";

const BARS = 24;

/** A small bar spectrum of one side of the conversation (decorative: the status says what happens). */
export function Visualizer({ label, analyser, active }: { label: string; analyser: AnalyserNode | null; active: boolean }) {
  const canvas = useRef<HTMLCanvasElement>(null);
  const bins = useRef<Uint8Array<ArrayBuffer> | null>(null);
  const draw = useCallback((node: AnalyserNode | null) => {
    const el = canvas.current;
    const g = el?.getContext("2d");
    if (!el || !g) return;
    const dpr = window.devicePixelRatio || 1;
    const w = el.clientWidth * dpr;
    const h = el.clientHeight * dpr;
    if (el.width !== w || el.height !== h) {
      el.width = w;
      el.height = h;
    }
    g.clearRect(0, 0, w, h);
    const color = getComputedStyle(el).color;
    g.fillStyle = color;
    let data: Uint8Array | null = null;
    if (node !== null) {
      if (bins.current === null || bins.current.length !== node.frequencyBinCount) bins.current = new Uint8Array(node.frequencyBinCount);
      node.getByteFrequencyData(bins.current);
      data = bins.current;
    }
    const gap = 3 * dpr;
    const bw = (w - gap * (BARS - 1)) / BARS;
    for (let i = 0; i < BARS; i++) {
      let v = 0;
      if (data !== null) {
        // Speech lives low: spread the bars over the first ~8 kHz, roughly logarithmically.
        const lo = Math.floor(((i / BARS) ** 1.6) * data.length * 0.35);
        const hi = Math.max(lo + 1, Math.floor((((i + 1) / BARS) ** 1.6) * data.length * 0.35));
        for (let k = lo; k < hi; k++) v = Math.max(v, data[k]);
        v /= 255;
      }
      const bh = Math.max(2 * dpr, v * h);
      const x = i * (bw + gap);
      g.globalAlpha = 0.35 + 0.65 * v;
      g.beginPath();
      g.roundRect(x, (h - bh) / 2, bw, bh, bw / 2);
      g.fill();
    }
    g.globalAlpha = 1;
  }, []);
  useAnalyserLoop(analyser, draw);
  return (
    <figure className={`visualizer${active ? " is-active" : ""}`}>
      <canvas ref={canvas} aria-hidden="true" />
      <figcaption>{label}</figcaption>
    </figure>
  );
}
