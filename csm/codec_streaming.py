"""Exact batched streaming Mimi encode and decode, with per-stream state in fixed-size slots.

This module owns everything between 24 kHz PCM and Mimi codes (32 codebooks, 12.5 Hz frames of 1920
samples). It wraps transformers' `MimiModel` and reuses its modules and weights, but adds what that model
lacks for serving: streaming with per-stream state for every causal conv (left context), every transposed
conv (overlap tail), and the transformers' sliding-window KV caches, batched over a fixed number of slots.

Streaming contract (for `StreamingDecoder` and `StreamingEncoder`):
- state is allocated once, with fixed shapes, for `num_slots` streams; slots are indices;
- `open(slot)` resets that slot's state in place; `close(slot)` marks it inactive;
- one `step` advances every active slot by the same number of frames; an inactive slot behaves as if its
  step never happened (its state is untouched, its output rows are zeros);
- decoding or encoding a stream in chunks of any size gives the same result as transformers' whole-clip
  `MimiModel.decode` / `MimiModel.encode` (up to float rounding: ~1e-7 relative in fp32).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import MimiConfig
from transformers.models.mimi.modeling_mimi import (
    MimiConv1d,
    MimiConvTranspose1d,
    MimiResnetBlock,
    MimiTransformerLayer,
    MimiTransformerModel,
    apply_rotary_pos_emb,
    repeat_kv,
)

from csm.audio import FRAME_SIZE
from csm.codec import NUM_CODEBOOKS, MimiCodec, MimiParts, rotary
from csm.host import to_host, to_host_each

# Frames of codes replayed into a fresh slot to rebuild a lost decoder state (`StreamingDecoder.recover`).
# Measured with `bench/codec.py --recovery --threads 1 --preset {tiny,mimi}`: SNR (dB, mean / min of 4
# random 161-frame code sequences, random weights, fp32, CPU) of the 2 s decoded right after frame 136,
# against the exact decode of the whole sequence:
#
#   N frames                   0      1      2      4      8     16     32     64    128    132
#   tiny (window 8 frames)   11.9   14.2   17.1   31.0   94.9  125.4  125.4  125.4  125.4  125.4
#                            10.2   12.3   15.3   30.6   92.6  125.3  125.3  125.3  125.3  125.3
#   mimi (window 125 fr.)    11.3   13.8   16.8   28.9   56.2   58.6   61.6   66.0  109.1  115.5
#                            11.2   13.5   16.1   27.8   55.9   57.9   60.1   65.1  107.8  115.3
#
# The convolutions' memory (~5 frames) dominates: SNR jumps from ~29 to ~56 dB between N=4 and N=8; after
# that the missing attention context costs little (+10 dB by N=64), and N >= 125 + 5 frames rebuilds the
# state exactly for any weights (the attention window is 250 positions at 25 Hz). Default: 16 frames
# (1.3 s of codes, one batch-1 decode of 2 steps), twice the conv memory, ≥58 dB at real dims. Random
# weights may lean on long context less than trained ones; callers that can afford it pass frames=130.
RECOVERY_FRAMES = 16


# ---------------------------------------------------------------------------------------------- stream state


@dataclass
class _ConvState:
    """Left context of one causal conv: its last `padding_total` inputs, per slot."""

    context: Tensor  # [S, C_in, P]
    fresh: Tensor  # [S] bool: nothing seen yet (replicate padding then copies the first input)
    replicate: bool

    def reset(self, mask: Tensor) -> None:
        self.context.masked_fill_(mask[:, None, None], 0.0)
        self.fresh |= mask


@dataclass
class _ConvTransposeState:
    """Overlap tail of one transposed conv: its last K - stride outputs (no bias), owed to the next chunk."""

    tail: Tensor  # [S, C_out, K - stride]

    def reset(self, mask: Tensor) -> None:
        self.tail.masked_fill_(mask[:, None, None], 0.0)


@dataclass
class _ResnetState:
    """Contexts of a SEANet residual block's convs (and its conv shortcut, if any)."""

    convs: list[_ConvState]
    shortcut: _ConvState | None

    def reset(self, mask: Tensor) -> None:
        for conv in [*self.convs, self.shortcut]:
            if conv is not None:
                conv.reset(mask)


@dataclass
class _SeanetState:
    """One state per SEANet layer (None for the stateless ELUs)."""

    layers: list[_ConvState | _ConvTransposeState | _ResnetState | None]

    def reset(self, mask: Tensor) -> None:
        for layer in self.layers:
            if layer is not None:
                layer.reset(mask)


@dataclass
class _TransformerState:
    """Sliding-window KV cache of every layer, as rings of `capacity` positions, and each slot's position.

    capacity = window + max positions per step - 1: a step writes its keys before attending, and what it
    overwrites is then already out of every query's window, so inactive slots may write garbage freely.
    """

    keys: list[Tensor]  # per layer [S, H_kv, capacity, head_dim]
    values: list[Tensor]
    position: Tensor  # [S] int64: position of the slot's next input
    window: int

    def reset(self, mask: Tensor) -> None:
        self.position.masked_fill_(mask, 0)
        for cache in [*self.keys, *self.values]:
            cache.masked_fill_(mask[:, None, None, None], 0.0)


@dataclass
class _DecoderStreamState:
    """Everything a decoding stream carries between steps."""

    upsample: _ConvTransposeState
    transformer: _TransformerState
    seanet: _SeanetState

    def reset(self, mask: Tensor) -> None:
        self.upsample.reset(mask)
        self.transformer.reset(mask)
        self.seanet.reset(mask)


@dataclass
class _EncoderStreamState:
    """Everything an encoding stream carries between steps."""

    seanet: _SeanetState
    transformer: _TransformerState
    downsample: _ConvState

    def reset(self, mask: Tensor) -> None:
        self.seanet.reset(mask)
        self.transformer.reset(mask)
        self.downsample.reset(mask)


def _map_tensors(state: Any, fn) -> Any:
    """The same nested state (dataclasses and lists of tensors) with `fn` applied to every tensor."""
    if isinstance(state, Tensor):
        return fn(state)
    if isinstance(state, list):
        return [_map_tensors(item, fn) for item in state]
    if dataclasses.is_dataclass(state):
        mapped = {f.name: _map_tensors(getattr(state, f.name), fn) for f in dataclasses.fields(state)}
        return dataclasses.replace(state, **mapped)
    return state


def _slot_view(state: Any, slot: int) -> Any:
    """The same state narrowed to one slot. Views: in-place updates land in the batched state."""
    return _map_tensors(state, lambda t: t[slot : slot + 1])


def _take_rows(state: Any, rows: Tensor) -> Any:
    """A copy of the state holding only `rows` (slots), in that order."""
    return _map_tensors(state, lambda t: t.index_select(0, rows))


def _put_rows(state: Any, rows: Tensor, part: Any) -> None:
    """Write `part` (from `_take_rows(state, rows)`, since updated) back into `state`'s `rows`."""
    if isinstance(state, Tensor):
        state.index_copy_(0, rows, part)
    elif isinstance(state, list):
        for item, piece in zip(state, part, strict=True):
            _put_rows(item, rows, piece)
    elif dataclasses.is_dataclass(state):
        for f in dataclasses.fields(state):
            _put_rows(getattr(state, f.name), rows, getattr(part, f.name))


def _run_active(step, state: Any, active: Tensor, x: Tensor, *args: Any) -> Tensor:
    """`step(state, x, active, *args)` for the active slots only, when they are a minority.

    The step functions compute every slot and mask the result (fixed shapes, as a captured graph wants);
    with few streams among many slots that costs the idle slots' compute too, which on CPU dominates.
    So gather the active slots' state, run them alone, and scatter it back. Output rows of inactive
    slots are zeros, as the masked path gives.
    """
    if x.device.type == "cuda":  # first: `nonzero` would wait for the device to know the row count
        return step(state, x, active, *args)
    rows = active.nonzero()[:, 0]
    n = rows.numel()
    bucket = 1 << (n - 1).bit_length() if n else 0
    if n == 0 or bucket * 2 > active.numel():
        return step(state, x, active, *args)
    # Rows in powers of two, idle slots riding along masked: oneDNN keeps a kernel per conv shape, so
    # every stream count from 1 to 16 would be its own set (and a tokenizer's memory grew with them).
    rows = torch.cat([rows, (~active).nonzero()[: bucket - n, 0]])
    part = _take_rows(state, rows)
    out_rows = step(part, x.index_select(0, rows), active.index_select(0, rows), *args)
    _put_rows(state, rows, part)
    out = out_rows.new_zeros(active.shape[0], *out_rows.shape[1:])
    return out.index_copy_(0, rows, out_rows)


# ---------------------------------------------------------------------------------------------- state setup


def _new_conv_state(conv: MimiConv1d, slots: int, like: Tensor) -> _ConvState:
    inner = conv.conv
    padding = (inner.kernel_size[0] - 1) * inner.dilation[0] + 1 - inner.stride[0]
    return _ConvState(
        context=like.new_zeros(slots, inner.in_channels, padding),
        fresh=torch.ones(slots, dtype=torch.bool, device=like.device),
        replicate=conv.pad_mode == "replicate",
    )


def _new_conv_transpose_state(conv: MimiConvTranspose1d, slots: int, like: Tensor) -> _ConvTransposeState:
    inner = conv.conv
    return _ConvTransposeState(
        like.new_zeros(slots, inner.out_channels, inner.kernel_size[0] - inner.stride[0])
    )


def _new_seanet_state(layers: nn.ModuleList, slots: int, like: Tensor) -> _SeanetState:
    states: list[_ConvState | _ConvTransposeState | _ResnetState | None] = []
    for layer in layers:
        if isinstance(layer, MimiConv1d):
            states.append(_new_conv_state(layer, slots, like))
        elif isinstance(layer, MimiConvTranspose1d):
            states.append(_new_conv_transpose_state(layer, slots, like))
        elif isinstance(layer, MimiResnetBlock):
            convs = [_new_conv_state(c, slots, like) for c in layer.block if isinstance(c, MimiConv1d)]
            shortcut = (
                _new_conv_state(layer.shortcut, slots, like)
                if isinstance(layer.shortcut, MimiConv1d)
                else None
            )
            states.append(_ResnetState(convs, shortcut))
        elif isinstance(layer, nn.ELU):
            states.append(None)
        else:
            raise TypeError(f"no streaming rule for SEANet layer {type(layer).__name__}")
    return _SeanetState(states)


def _new_transformer_state(
    model: MimiTransformerModel, config: MimiConfig, slots: int, max_positions: int, like: Tensor
) -> _TransformerState:
    capacity = config.sliding_window + max_positions - 1
    shape = (slots, config.num_key_value_heads, capacity, config.head_dim)
    return _TransformerState(
        keys=[like.new_zeros(shape) for _ in model.layers],
        values=[like.new_zeros(shape) for _ in model.layers],
        position=torch.zeros(slots, dtype=torch.long, device=like.device),
        window=config.sliding_window,
    )


# ------------------------------------------------------------------------------------------ streaming math
# Each function runs one module of transformers' Mimi on a chunk, with that module's weights, and updates the
# state of active slots in place. `active`: [S] bool. `final`: the clip's last, partial chunk, padded on the
# right exactly as transformers pads a whole clip whose length is not a multiple of the frame.


def _conv_step(conv: MimiConv1d, state: _ConvState, x: Tensor, active: Tensor, final: bool = False) -> Tensor:
    # x: [S, C_in, L] → [S, C_out, L / stride]
    context = state.context
    if state.replicate:
        context = torch.where(state.fresh[:, None, None], x[..., :1].expand_as(context), context)
    full = torch.cat([context, x], dim=-1)
    if final:
        # transformers' `_get_extra_padding_for_conv1d`, in ints: its tensor form would cost a host sync.
        extra = -x.shape[-1] % conv.conv.stride[0]
        full = F.pad(full, (0, extra), mode="replicate" if state.replicate else "constant")
    else:
        keep = full[..., full.shape[-1] - context.shape[-1] :]
        state.context.copy_(torch.where(active[:, None, None], keep, state.context))
    state.fresh &= ~active
    return conv.conv(full)


def _conv_transpose_step(
    conv: MimiConvTranspose1d, state: _ConvTransposeState, x: Tensor, active: Tensor
) -> Tensor:
    # x: [S, C_in, L] → [S, C_out, L * stride]; the whole-clip output is trimmed only on the right
    # (trim_right_ratio 1), so chunk outputs concatenate to it once each tail is added to the next chunk.
    inner = conv.conv
    y = _conv_transpose_no_bias(x, inner)
    overlap = state.tail.shape[-1]
    y = torch.cat([y[..., :overlap] + state.tail, y[..., overlap:]], dim=-1)
    emitted = x.shape[-1] * inner.stride[0]
    state.tail.copy_(torch.where(active[:, None, None], y[..., emitted:], state.tail))
    out = y[..., :emitted]
    return out if inner.bias is None else out + inner.bias[:, None]


def _conv_transpose_no_bias(x: Tensor, conv: nn.ConvTranspose1d) -> Tensor:
    # x: [S, C_in, L] → [S, C_out, (L - 1) * stride + K]. One matmul against the weight as stored, then an
    # overlap-add: on CPU, torch's transposed conv copies a large weight on every call, which dominates a
    # streaming step (46 ms of 60 for real-dims Mimi at batch 1).
    stride, kernel = conv.stride[0], conv.kernel_size[0]
    if conv.groups != 1 or kernel % stride:
        return F.conv_transpose1d(x, conv.weight, None, conv.stride, 0, 0, conv.groups)
    slots, _, length = x.shape
    out_channels, blocks = conv.out_channels, kernel // stride
    cols = x.transpose(1, 2) @ conv.weight.flatten(1)  # [S, L, C_out * K]
    # [S, m, C_out, L, s]: block j of the kernel lands j * stride samples later
    cols = cols.view(slots, length, out_channels, blocks, stride).permute(0, 3, 2, 1, 4)
    y = x.new_zeros(slots, out_channels, (length + blocks - 1) * stride)
    span = length * stride
    for block in range(blocks):
        start = block * stride
        y[..., start : start + span] += cols[:, block].reshape(slots, out_channels, span)
    return y


def _resnet_step(
    block: MimiResnetBlock, state: _ResnetState, x: Tensor, active: Tensor, final: bool
) -> Tensor:
    h = x
    convs = iter(state.convs)
    for layer in block.block:
        h = _conv_step(layer, next(convs), h, active, final) if isinstance(layer, MimiConv1d) else layer(h)
    residual = x if state.shortcut is None else _conv_step(block.shortcut, state.shortcut, x, active, final)
    return residual + h


def _seanet_step(
    layers: nn.ModuleList, state: _SeanetState, x: Tensor, active: Tensor, final: bool = False
) -> Tensor:
    for layer, layer_state in zip(layers, state.layers, strict=True):
        if isinstance(layer, MimiConv1d):
            x = _conv_step(layer, layer_state, x, active, final)
        elif isinstance(layer, MimiConvTranspose1d):
            x = _conv_transpose_step(layer, layer_state, x, active)
        elif isinstance(layer, MimiResnetBlock):
            x = _resnet_step(layer, layer_state, x, active, final)
        else:
            x = layer(x)
    return x


def _transformer_step(
    model: MimiTransformerModel, state: _TransformerState, x: Tensor, active: Tensor
) -> Tensor:
    # x: [S, n, D] → [S, n, D]; positions continue per slot, attention sees the last `window` positions.
    n = x.shape[1]
    capacity = state.keys[0].shape[2]
    if n > capacity - state.window + 1:
        raise ValueError(
            f"{n} positions in one step; the state was allocated for {capacity - state.window + 1}"
        )
    offsets = torch.arange(n, device=x.device)
    query_pos = state.position[:, None] + offsets  # [S, n]
    ring = query_pos % capacity  # [S, n]: where each new key goes
    newest = query_pos[:, -1:]  # [S, 1]
    key_pos = newest - torch.remainder(newest - torch.arange(capacity, device=x.device), capacity)  # [S, C]
    distance = query_pos[:, :, None] - key_pos[:, None, :]  # [S, n, C]
    mask = ((key_pos[:, None, :] >= 0) & (distance >= 0) & (distance < state.window))[:, None]  # [S,1,n,C]
    cos, sin = rotary(model)(x, query_pos)
    for layer, keys, values in zip(model.layers, state.keys, state.values, strict=True):
        x = _transformer_layer_step(layer, keys, values, ring, mask, x, cos, sin)
    state.position += n * active.long()
    return x


def _transformer_layer_step(
    layer: MimiTransformerLayer,
    keys: Tensor,
    values: Tensor,
    ring: Tensor,
    mask: Tensor,
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
) -> Tensor:
    attn = layer.self_attn
    slots, n, _ = x.shape
    h = layer.input_layernorm(x)
    q = attn.q_proj(h).view(slots, n, -1, attn.head_dim).transpose(1, 2)  # [S, H, n, Dh]
    k = attn.k_proj(h).view(slots, n, -1, attn.head_dim).transpose(1, 2)  # [S, H_kv, n, Dh]
    v = attn.v_proj(h).view(slots, n, -1, attn.head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    index = ring[:, None, :, None].expand_as(k)
    keys.scatter_(2, index, k)
    values.scatter_(2, index, v)
    groups = attn.num_key_value_groups
    o = F.scaled_dot_product_attention(
        q, repeat_kv(keys, groups), repeat_kv(values, groups), attn_mask=mask, scale=attn.scaling
    )
    x = x + layer.self_attn_layer_scale(attn.o_proj(o.transpose(1, 2).reshape(slots, n, -1)))
    return x + layer.mlp_layer_scale(layer.mlp(layer.post_attention_layernorm(x)))


# ---------------------------------------------------------------------------------------------- decoder


class StreamingDecoder:
    """Exact streaming Mimi decode, batched across `num_slots` streams (see the module docstring's contract).

    `step(codes)` decodes the next k frames of every active slot in one forward; any k up to
    `max_frames_per_step` (fixed at allocation, it sizes the KV rings).
    """

    def __init__(self, codec: MimiCodec, num_slots: int, max_frames_per_step: int = 8) -> None:
        self.codec = codec
        self.num_slots = num_slots
        self.max_frames_per_step = max_frames_per_step
        like = torch.empty(0, device=codec.device, dtype=codec.dtype)
        parts = codec.parts
        positions = max_frames_per_step * parts.upsample.conv.stride[0]
        self._state = _DecoderStreamState(
            upsample=_new_conv_transpose_state(parts.upsample, num_slots, like),
            transformer=_new_transformer_state(
                parts.decoder_transformer, codec.config, num_slots, positions, like
            ),
            seanet=_new_seanet_state(parts.decoder_seanet, num_slots, like),
        )
        self.active = torch.zeros(num_slots, dtype=torch.bool, device=codec.device)

    def open(self, slot: int) -> None:
        """Start a new stream in `slot` (its state is reset in place)."""
        self.reset(_one_slot(slot, self.num_slots, self.active.device))
        self.active[slot] = True

    def close(self, slot: int) -> None:
        """End the stream in `slot`; its state stays as it was until the slot is opened again."""
        self.active[slot] = False

    def reset(self, mask: Tensor) -> None:
        """Reset the state of every slot in `mask` ([S] bool), in place."""
        self._state.reset(mask.to(self.active.device))

    @torch.no_grad()
    def step(self, codes: Tensor, advance: Tensor | None = None) -> Tensor:
        """codes: [S, 32, k] int64 → pcm [S, k * 1920] float32 (zeros for slots that did not advance).

        `advance` ([S] bool, default all): which open slots have a chunk this step; the others sit it out as
        if it never happened and continue seamlessly at a later step. Rows of the others are ignored.
        """
        if codes.shape[0] != self.num_slots or codes.shape[1] != NUM_CODEBOOKS:
            raise ValueError(
                f"codes shape {tuple(codes.shape)}; expected [{self.num_slots}, {NUM_CODEBOOKS}, k]"
            )
        if not 0 < codes.shape[2] <= self.max_frames_per_step:
            raise ValueError(f"{codes.shape[2]} frames in one step; allowed 1..{self.max_frames_per_step}")
        active = self.active if advance is None else self.active & advance.to(self.active.device)
        decode = lambda st, c, a: _decode_chunk(self.codec.parts, st, c, a)  # noqa: E731
        pcm = _run_active(decode, self._state, active, codes.to(self.active.device))
        return torch.where(active[:, None], pcm, 0.0)

    @torch.no_grad()
    def recover(self, slot: int, codes: Tensor, frames: int = RECOVERY_FRAMES) -> None:
        """Rebuild a lost stream in `slot` from its codes so far ([32, T]): open the slot and replay the last
        `frames` frames, discarding their audio. The next `step` continues the stream (see RECOVERY_FRAMES
        for how close that gets)."""
        self.open(slot)
        tail = codes[:, max(0, codes.shape[1] - frames) :].to(self.active.device)
        view = _slot_view(self._state, slot)
        active = torch.ones(1, dtype=torch.bool, device=self.active.device)
        for start in range(0, tail.shape[1], self.max_frames_per_step):
            _decode_chunk(
                self.codec.parts, view, tail[None, :, start : start + self.max_frames_per_step], active
            )


@dataclass(frozen=True)
class DecodeChunk:
    """One stream's next frames, for `decode_pcm16`."""

    slot: int
    codes: np.ndarray  # [k, 32] integer codes
    fresh: bool  # reset the slot first (a new stream, or one whose state this decoder lost)
    history: np.ndarray | None = None  # [n, 32]: the frames before `codes`, replayed into a fresh state


def decode_pcm16(decoder: StreamingDecoder, chunks: Sequence[DecodeChunk]) -> list[np.ndarray]:
    """PCM16 audio ([k * 1920] int16) of each chunk, in order.

    One batched step per distinct chunk length (usually one); its audio is converted to int16 on the
    codec's device and copied to the host once for the whole group (`csm.host.to_host`)."""
    for c in chunks:
        if c.history is not None and len(c.history):
            decoder.recover(c.slot, torch.from_numpy(c.history.T.astype(np.int64)))
        elif c.fresh:
            decoder.open(c.slot)
    results: list[np.ndarray | None] = [None] * len(chunks)
    for k in sorted({c.codes.shape[0] for c in chunks}):
        group = [i for i, c in enumerate(chunks) if c.codes.shape[0] == k]
        slots = [chunks[i].slot for i in group]
        codes = torch.zeros(decoder.num_slots, NUM_CODEBOOKS, k, dtype=torch.long)  # host: one copy over
        for i in group:
            codes[chunks[i].slot] = torch.from_numpy(chunks[i].codes.T.astype(np.int64))
        advance = torch.zeros(decoder.num_slots, dtype=torch.bool)
        advance[slots] = True
        pcm = decoder.step(codes, advance)  # [S, k * 1920] float, on the codec's device
        rows = pcm[torch.tensor(slots)]  # [len(group), k * 1920]: the index goes over with the op
        audio = to_host((rows.clamp(-1, 1) * 32767).round().to(torch.int16))
        for j, i in enumerate(group):
            results[i] = audio[j]
    return results


def _one_slot(slot: int, num_slots: int, device: torch.device) -> Tensor:
    if not 0 <= slot < num_slots:
        raise IndexError(f"slot {slot} out of range 0..{num_slots - 1}")
    mask = torch.zeros(num_slots, dtype=torch.bool, device=device)
    mask[slot] = True
    return mask


def _decode_chunk(parts: MimiParts, state: _DecoderStreamState, codes: Tensor, active: Tensor) -> Tensor:
    # codes: [S, K, k] → pcm [S, k * 1920] float32
    latents = parts.quantizer.decode(codes)  # [S, D, k]: per frame, stateless
    h = _conv_transpose_step(parts.upsample, state.upsample, latents, active)  # [S, D, 2k]
    h = _transformer_step(parts.decoder_transformer, state.transformer, h.transpose(1, 2), active)
    audio = _seanet_step(parts.decoder_seanet, state.seanet, h.transpose(1, 2), active)
    return audio[:, 0].float()


# ---------------------------------------------------------------------------------------------- encoder


class StreamingEncoder:
    """Exact streaming Mimi encode, batched across `num_slots` streams (see the module docstring's contract).

    `push(slot, pcm)` buffers 24 kHz audio of any length; `encode_ready()` encodes every complete 1920-sample
    frame buffered, batched across slots; `flush(slot)` encodes the rest (a partial frame is padded as
    transformers pads a whole clip) and ends the stream. The codes equal `MimiModel.encode` of the whole clip.
    """

    def __init__(self, codec: MimiCodec, num_slots: int, max_frames_per_step: int = 8) -> None:
        self.codec = codec
        self.num_slots = num_slots
        self.max_frames_per_step = max_frames_per_step
        like = torch.empty(0, device=codec.device, dtype=codec.dtype)
        parts = codec.parts
        positions = max_frames_per_step * parts.downsample.conv.stride[0]
        self._state = _EncoderStreamState(
            seanet=_new_seanet_state(parts.encoder_seanet, num_slots, like),
            transformer=_new_transformer_state(
                parts.encoder_transformer, codec.config, num_slots, positions, like
            ),
            downsample=_new_conv_state(parts.downsample, num_slots, like),
        )
        self.device = codec.device
        # Host-side: which slots are open, and their audio not yet encoded (the input arrives on the host).
        self.active = [False] * num_slots
        self._pending: list[Tensor] = [like.new_zeros(0) for _ in range(num_slots)]

    def open(self, slot: int) -> None:
        """Start a new stream in `slot`: state reset in place, buffered audio dropped."""
        self._state.reset(_one_slot(slot, self.num_slots, self.device))
        self._pending[slot] = self._pending[slot].new_zeros(0)
        self.active[slot] = True

    def close(self, slot: int) -> None:
        """End the stream in `slot`, dropping any buffered audio (use `flush` to encode it)."""
        self.active[slot] = False
        self._pending[slot] = self._pending[slot].new_zeros(0)

    def push(self, slot: int, pcm: Tensor) -> None:
        """Buffer float audio ([n], 24 kHz) for an open slot."""
        if not self.active[slot]:
            raise ValueError(f"slot {slot} is not open")
        if pcm.ndim != 1 or not pcm.is_floating_point():
            raise ValueError(f"pcm must be a 1-D float tensor, got {pcm.dtype} {tuple(pcm.shape)}")
        self._pending[slot] = torch.cat([self._pending[slot], pcm.to(self._pending[slot])])

    def pending_samples(self, slot: int) -> int:
        return self._pending[slot].shape[0]

    @torch.no_grad()
    def encode_ready(self) -> list[Tensor]:
        """Encode every complete frame buffered; per slot, codes [32, F] int64 (F may be 0)."""
        out: list[list[Tensor]] = [[] for _ in range(self.num_slots)]
        while True:
            ready = [self.pending_samples(s) // FRAME_SIZE for s in range(self.num_slots)]
            if not any(ready):
                break
            # One forward advances every ready slot by the same number of frames.
            frames = min(min(r for r in ready if r), self.max_frames_per_step)
            length = frames * FRAME_SIZE
            active = torch.tensor([r > 0 for r in ready], device=self.device)
            chunk = self._pending[0].new_zeros(self.num_slots, 1, length)
            for slot, count in enumerate(ready):
                if count:
                    chunk[slot, 0] = self._pending[slot][:length]
                    self._pending[slot] = self._pending[slot][length:]
            encode = lambda st, x, a: _encode_chunk(self.codec.parts, st, x, a)  # noqa: E731
            codes = _run_active(encode, self._state, active, chunk)
            for slot, count in enumerate(ready):
                if count:
                    out[slot].append(codes[slot])
        empty = torch.zeros(NUM_CODEBOOKS, 0, dtype=torch.long, device=self.device)
        return [torch.cat(parts, dim=-1) if parts else empty for parts in out]

    @torch.no_grad()
    def flush(self, slot: int) -> Tensor:
        """Encode everything still buffered for `slot` (the last frame may be partial) and close it."""
        view = _slot_view(self._state, slot)
        active = torch.ones(1, dtype=torch.bool, device=self.device)
        pending = self._pending[slot]
        whole = pending.shape[0] // FRAME_SIZE * FRAME_SIZE
        parts = []
        for start in range(0, whole, self.max_frames_per_step * FRAME_SIZE):
            piece = pending[start : min(start + self.max_frames_per_step * FRAME_SIZE, whole)]
            parts.append(_encode_chunk(self.codec.parts, view, piece[None, None], active)[0])
        if whole < pending.shape[0]:
            # The partial last frame has any length, so each would be a new set of conv shapes for oneDNN
            # to compile and keep (~0.3 MB each, a cache of 1,024): it runs on ATen's own convolution.
            with _without_onednn(self.device):
                piece = pending[whole:][None, None]
                parts.append(_encode_chunk(self.codec.parts, view, piece, active, final=True)[0])
        self.close(slot)
        empty = torch.zeros(NUM_CODEBOOKS, 0, dtype=torch.long, device=self.device)
        return torch.cat(parts, dim=-1) if parts else empty


@contextlib.contextmanager
def _without_onednn(device: torch.device) -> Iterator[None]:
    """CPU convolutions on ATen's kernels, not oneDNN's, inside (the switch is process-wide: another
    thread's codec step meanwhile runs there too, with the same results to float rounding)."""
    if device.type != "cpu":
        yield
        return
    was = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = was


@dataclass(frozen=True)
class EncodeChunk:
    """One stream's next audio, for `encode_pcm16`."""

    slot: int
    pcm: np.ndarray  # int16, 24 kHz
    fresh: bool  # open the slot first (a new stream, or one sent again from its start)
    final: bool  # the stream's last audio: encode its partial last frame too, and close the slot


def encode_pcm16(encoder: StreamingEncoder, chunks: Sequence[EncodeChunk]) -> list[np.ndarray]:
    """Codes ([F, 32] int16) of each chunk, in order: every frame its audio completes (with `final`, the
    rest too). All complete frames are encoded in one batched pass, copied to the host once."""
    for c in chunks:
        if c.fresh:
            encoder.open(c.slot)
        encoder.push(c.slot, torch.from_numpy(c.pcm.astype(np.float32) / 32768.0))
    ready = encoder.encode_ready()
    out = []
    for c in chunks:
        codes = ready[c.slot]
        if c.final:
            codes = torch.cat([codes, encoder.flush(c.slot)], dim=-1)
        out.append(codes.T.to(torch.int16))
        ready[c.slot] = codes[:, :0]  # a stream pushed twice in one batch gets its codes once
    return to_host_each(out)


def _encode_chunk(
    parts: MimiParts, state: _EncoderStreamState, pcm: Tensor, active: Tensor, final: bool = False
) -> Tensor:
    # pcm: [S, 1, L] → codes [S, K, ceil(L / 1920)]
    h = _seanet_step(parts.encoder_seanet, state.seanet, pcm, active, final)  # [S, D, L / 960]
    h = _transformer_step(parts.encoder_transformer, state.transformer, h.transpose(1, 2), active)
    latents = _conv_step(parts.downsample, state.downsample, h.transpose(1, 2), active, final)
    return parts.quantizer.encode(latents, NUM_CODEBOOKS).transpose(0, 1)
