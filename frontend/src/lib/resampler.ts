/**
 * A streaming band-limited resampler: Kaiser-windowed sinc, polyphase, exact rational phase tracking.
 *
 * Output sample k sits at input position t_k = k * inRate / outRate. With g = gcd(inRate, outRate),
 * up = outRate / g and down = inRate / g, the position is kept as an integer part plus a numerator over
 * `up`, so it never drifts however long the stream runs. For every phase (numerator) the filter's taps
 * are computed once (`bank`), each phase normalised to unity gain at DC.
 *
 * The low-pass cutoff puts the stop band edge at the lower of the two Nyquist frequencies: when
 * downsampling (capture: 48 kHz → 24 kHz) nothing above 12 kHz aliases back into the band, when
 * upsampling (playback: 24 kHz → 48 kHz) the images above 12 kHz are removed. With the defaults
 * (24 zero crossings, 80 dB Kaiser), around 24 kHz: within 0.1 dB up to 8 kHz, -0.4 dB at 10 kHz, over
 * 80 dB down from 13 kHz; the delay is half the filter, 1 ms (it is compensated: output k is input time
 * k / outRate exactly).
 *
 * Streaming: `process` may be called with chunks of any size (the audio thread's 128 frames, a
 * network delta); the output is the same as resampling the concatenation in one call. `flush` emits
 * what is still held back by the filter's look-ahead, as if the input were followed by silence, and
 * resets the stream.
 */

export interface ResamplerOptions {
  /** Zero crossings of the sinc on each side, in units of the lower of the two rates. */
  zeroCrossings?: number;
  /** Stop band attenuation of the Kaiser window, in dB. */
  attenuationDb?: number;
}

const MAX_EXACT_PHASES = 1024;

function gcd(a: number, b: number): number {
  while (b) [a, b] = [b, a % b];
  return a;
}

/** The zeroth-order modified Bessel function of the first kind (power series; converges fast here). */
function besselI0(x: number): number {
  let sum = 1;
  let term = 1;
  const q = (x * x) / 4;
  for (let k = 1; k < 64; k++) {
    term *= q / (k * k);
    sum += term;
    if (term < sum * 1e-12) break;
  }
  return sum;
}

export class Resampler {
  readonly inRate: number;
  readonly outRate: number;
  /** Filter delay, in input samples. */
  readonly delay: number;
  private readonly up: number;
  private readonly down: number;
  private readonly half: number;
  private readonly taps: number;
  /** Phases actually tabulated: `up` when it is small, else a fine grid that is interpolated. */
  private readonly phases: number;
  private readonly bank: Float32Array;
  private readonly passthrough: boolean;
  // Stream state. `buf[0]` is input sample number `base` (negative at the start: leading zeros).
  private buf: Float32Array;
  private len = 0;
  private base = 0;
  private ip = 0; // integer input position of the next output
  private frac = 0; // its fractional part, as a numerator over `up`
  private end = 0; // real input samples received so far

  constructor(inRate: number, outRate: number, options: ResamplerOptions = {}) {
    if (!(inRate > 0 && outRate > 0) || !Number.isInteger(inRate) || !Number.isInteger(outRate)) {
      throw new RangeError(`sample rates must be positive integers, got ${inRate} → ${outRate}`);
    }
    this.inRate = inRate;
    this.outRate = outRate;
    const g = gcd(inRate, outRate);
    this.up = outRate / g;
    this.down = inRate / g;
    this.passthrough = inRate === outRate;
    const zeros = options.zeroCrossings ?? 24;
    const attenuation = options.attenuationDb ?? 80;
    const scale = Math.min(1, outRate / inRate); // the lower Nyquist, relative to the input's
    this.half = this.passthrough ? 0 : Math.ceil(zeros / scale);
    this.taps = 2 * this.half;
    this.delay = this.half;
    // Kaiser design: transition width from the filter length, cutoff so the stop band starts at Nyquist.
    const transition = (attenuation - 7.95) / (14.36 * Math.max(this.taps, 1));
    const cutoff = 0.5 * scale - transition / 2; // cycles per input sample, at the -6 dB point
    const beta = attenuation > 50 ? 0.1102 * (attenuation - 8.7) : 0.5842 * (attenuation - 21) ** 0.4 + 0.07886 * (attenuation - 21);
    const i0beta = besselI0(beta);
    this.phases = this.passthrough ? 1 : Math.min(this.up, MAX_EXACT_PHASES);
    // One extra row (phase == 1.0, i.e. the next input sample) so interpolated phases need no wrap.
    this.bank = new Float32Array((this.phases + 1) * Math.max(this.taps, 1));
    for (let p = 0; p <= this.phases && !this.passthrough; p++) {
      const f = p / this.phases;
      const row = p * this.taps;
      let sum = 0;
      for (let j = 0; j < this.taps; j++) {
        // Tap j multiplies input sample ip - half + 1 + j; its distance from the output position:
        const x = this.half - 1 - j + f;
        const r = x / this.half;
        const window = Math.abs(r) >= 1 ? 0 : besselI0(beta * Math.sqrt(1 - r * r)) / i0beta;
        const arg = 2 * cutoff * x;
        const sinc = arg === 0 ? 1 : Math.sin(Math.PI * arg) / (Math.PI * arg);
        const h = 2 * cutoff * sinc * window;
        this.bank[row + j] = h;
        sum += h;
      }
      for (let j = 0; j < this.taps; j++) this.bank[row + j] /= sum;
    }
    this.buf = new Float32Array(Math.max(4096, 4 * this.taps));
    this.reset();
  }

  /** Forget the stream: the next input is the start of a new one. */
  reset(): void {
    this.buf.fill(0, 0, this.half);
    this.len = this.half;
    this.base = -this.half;
    this.ip = 0;
    this.frac = 0;
    this.end = 0;
  }

  /** The most output samples `process(n samples)` can return. */
  maxOutput(inputLength: number): number {
    return Math.ceil(((inputLength + this.taps + 1) * this.up) / this.down) + 1;
  }

  /** Resample the next chunk of the stream. */
  process(input: Float32Array): Float32Array {
    if (this.passthrough) return input.slice();
    this.append(input);
    this.end += input.length;
    return this.drain(Infinity);
  }

  /** Emit what the filter still holds (the input followed by silence), then reset. */
  flush(): Float32Array {
    if (this.passthrough) return new Float32Array(0);
    this.append(new Float32Array(this.half));
    const out = this.drain(this.end);
    this.reset();
    return out;
  }

  private append(input: Float32Array): void {
    if (this.len + input.length > this.buf.length) {
      const grown = new Float32Array(Math.max(this.buf.length * 2, this.len + input.length));
      grown.set(this.buf.subarray(0, this.len));
      this.buf = grown;
    }
    this.buf.set(input, this.len);
    this.len += input.length;
  }

  /** Every output whose taps are all available (and whose position is before `limit`), then compact. */
  private drain(limit: number): Float32Array {
    const { up, down, half, taps, bank, phases } = this;
    const available = this.base + this.len; // absolute index one past the last buffered sample
    let count = 0;
    {
      let ip = this.ip;
      let frac = this.frac;
      while (ip + half < available && ip < limit) {
        count++;
        frac += down;
        ip += Math.floor(frac / up);
        frac %= up;
      }
    }
    const out = new Float32Array(count);
    const exact = phases === up;
    for (let k = 0; k < count; k++) {
      const start = this.ip - half + 1 - this.base;
      let acc = 0;
      if (exact) {
        const row = this.frac * taps;
        for (let j = 0; j < taps; j++) acc += this.buf[start + j] * bank[row + j];
      } else {
        const pos = (this.frac / up) * phases;
        const p = Math.floor(pos);
        const w = pos - p;
        const r0 = p * taps;
        const r1 = r0 + taps;
        for (let j = 0; j < taps; j++) {
          acc += this.buf[start + j] * (bank[r0 + j] + w * (bank[r1 + j] - bank[r0 + j]));
        }
      }
      out[k] = acc;
      this.frac += down;
      this.ip += Math.floor(this.frac / up);
      this.frac %= up;
    }
    // Keep only what the next output still needs: samples from ip - half + 1 on.
    const keepFrom = Math.min(this.ip - half + 1 - this.base, this.len);
    if (keepFrom > 0) {
      this.buf.copyWithin(0, keepFrom, this.len);
      this.len -= keepFrom;
      this.base += keepFrom;
    }
    return out;
  }
}

/** Resample a whole signal at once (the same result as streaming it through one `Resampler`). */
export function resample(input: Float32Array, inRate: number, outRate: number, options?: ResamplerOptions): Float32Array {
  const r = new Resampler(inRate, outRate, options);
  const a = r.process(input);
  const b = r.flush();
  const out = new Float32Array(a.length + b.length);
  out.set(a);
  out.set(b, a.length);
  return out;
}
