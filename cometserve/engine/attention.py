"""Attention over the engine's KV storage for one step: the metadata built once per step
(`AttentionMetadata`), the backends that write a layer's new K/V and read attention (INT4 paged
cache: `Int4Attention`; 16-bit: `Bf16Attention`; kernels where their `can_implement` accepts the
shapes, `kernels/ref.py` otherwise), and the per-layer views the model calls (`StepCache`,
`LayerView`: `layers[i].attend(q, k, v, positions, scale, rotary)`), so the model never learns it is
running a ragged batch."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from cometserve.engine.kv_storage import KVStorage
from cometserve.kernels import ref


@dataclass
class AttentionMetadata:
    """One step's attention metadata, shared by every layer. B sequences, T tokens.

    block_tables int32 [B, max_pages] (padded with the dummy page); cu_seqlens_q int32 [B+1];
    context_lens int32 [B] (after this step's write); seq_slots int32 [B] (INT4 window rows);
    slot_mapping int64 [T] (flat page * P + offset of each new token: the 16-bit cache's write).
    Host copies: start_pos, context lens and cu_seqlens as Python lists (no device syncs);
    max_seqlen_q, max_context_len: grid sizes the kernels would otherwise read from the device.
    """

    block_tables: torch.Tensor
    cu_seqlens_q: torch.Tensor
    context_lens: torch.Tensor
    seq_slots: torch.Tensor
    slot_mapping: torch.Tensor
    max_seqlen_q: int
    max_context_len: int
    start_pos_host: list[int]
    context_lens_host: list[int]
    cu_seqlens_host: list[int]
    kv_slots: torch.Tensor | None = None  # int64 [sum(context_lens)]: 16-bit continuation prefill
    cu_seqlens_k: torch.Tensor | None = None  # int32 [B+1] over kv_slots
    # a mixed step (decodes and prompt chunks): `decodes`, its leading num_decodes sequences (one token
    # each), for the decode kernel; `prefills`, the rest renumbered from 0, for the prefill path (which
    # would otherwise gather every decoding sequence's whole context). Built once per step (split()).
    num_decodes: int = 0
    decodes: AttentionMetadata | None = None
    prefills: AttentionMetadata | None = None

    @property
    def is_decode(self) -> bool:
        return self.max_seqlen_q == 1

    @cached_property
    def starts_at_zero(self) -> bool:
        """A prefill whose every chunk is a whole prompt's start (no cached prefix)."""
        return not self.is_decode and not any(self.start_pos_host)

    @cached_property
    def total_context(self) -> int:
        """sum(context_lens), from the host copy: once per step, not per layer."""
        return sum(self.context_lens_host)

    def split(self, d: int, cu_rest_host: list[int], cu_rest: torch.Tensor) -> None:
        """Make this mixed step's parts: its first d sequences bring one token each; cu_rest: the
        other sequences' cu_seqlens_q renumbered from 0 (int32, on the device; and on the host)."""
        self.num_decodes = d
        self.decodes = AttentionMetadata(
            self.block_tables[:d], self.cu_seqlens_q[: d + 1], self.context_lens[:d], self.seq_slots[:d],
            self.slot_mapping[:d], 1, max(self.context_lens_host[:d]), self.start_pos_host[:d],
            self.context_lens_host[:d], self.cu_seqlens_host[: d + 1])
        self.prefills = AttentionMetadata(
            self.block_tables[d:], cu_rest, self.context_lens[d:], self.seq_slots[d:], self.slot_mapping[d:],
            self.max_seqlen_q, max(self.context_lens_host[d:]), self.start_pos_host[d:], self.context_lens_host[d:],
            cu_rest_host)


def _read_split(read, m: AttentionMetadata, q: torch.Tensor, *kv: torch.Tensor) -> torch.Tensor:
    """read(m, q, *kv) over the whole step, or over a mixed step's decodes and prefills apart."""
    if m.prefills is None:
        return read(m, q, *kv)
    d = m.num_decodes
    return torch.cat((read(m.decodes, q[:d], *(x[:d] for x in kv)),
                      read(m.prefills, q[d:], *(x[d:] for x in kv))))


class Int4Attention:
    """write_kv + prefill/decode attention over `ref.PagedKVCache` (kernels where they apply)."""

    def __init__(self, storage: KVStorage, q_heads: int, dtype: torch.dtype, device: torch.device) -> None:
        self.write_kv, self.decode, self.prefill = ref.write_kv, ref.decode_attention, ref.prefill_attention
        self.own_rows = None
        self.reason = "not on CUDA"
        if device.type == "cuda":
            try:
                from cometserve.kernels import attention, kv_cache
            except ImportError as e:
                self.reason = f"kernels unavailable: {e}"
                return
            cache = storage.layers[0]
            q = torch.empty(1, q_heads, cache.head_dim, dtype=dtype, device=device)
            k = torch.empty(1, cache.num_kv_heads, cache.head_dim, dtype=dtype, device=device)
            ok_w, why_w = kv_cache.can_implement(k, cache)
            ok_a, why_a = attention.can_implement(q, cache)
            if ok_w:
                self.write_kv = kv_cache.write_kv
            if ok_a:
                self.decode, self.prefill = attention.decode_attention, attention.prefill_attention
            # prompts with no cached prefix attend over their own rows, which the write leaves holding
            # the cache's values (no gather pass); needs the write kernel, flash and k in the window's dtype
            if ok_w and ok_a and dtype == cache.k_window.dtype and _flash_varlen_works(
                    q_heads, cache.num_kv_heads, cache.head_dim, dtype, device):
                from cometserve.kernels import prefill_flash

                self.own_rows = prefill_flash  # own_rows_into, flash_own_rows
            self.reason = "; ".join(r for r in (why_w, why_a) if r) or "kernels"

    @property
    def graph_safe(self) -> bool:
        return self.decode is not ref.decode_attention and self.write_kv is not ref.write_kv

    def attend(self, cache, m: AttentionMetadata, q, k, v, positions, scale: float, rotary) -> torch.Tensor:
        # RoPE rides in the write (one launch fewer per layer in a decode step where the kernel runs)
        rope = (q, positions, *rotary.tables(q.device))
        p = m.prefills or m
        own = self.own_rows is not None and p.starts_at_zero
        # the write leaves the rows the cache gives back where flash reads them
        into = self.own_rows.own_rows_into(k, v, m.num_decodes, p.cu_seqlens_host) if own else None
        self.write_kv(k, v, cache, m.block_tables, m.cu_seqlens_q, m.context_lens, m.seq_slots, m.max_seqlen_q,
                      rope, dequantize_into=into)

        def read(m: AttentionMetadata, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            if m.is_decode:
                return self.decode(q, cache, m.block_tables, m.context_lens, m.seq_slots, scale, m.max_context_len)
            if own:
                return self.own_rows.flash_own_rows(q, k, v, m.cu_seqlens_q, m.max_seqlen_q, scale)
            return self.prefill(q, cache, m.block_tables, m.cu_seqlens_q, m.context_lens, m.seq_slots, scale,
                                m.max_seqlen_q, m.max_context_len, total_context=m.total_context)

        return _read_split(read, m, q, *(into or (k, v)))


class Bf16Attention:
    """16-bit paged cache: scatter by slot_mapping; decode through the paged decode kernel (or its
    reference). Prefill on CUDA: one FlashAttention-2 varlen call over the step's new K/V (every
    chunk a first chunk) or over the sequences' gathered pages (`kv_slots`); elsewhere, per
    sequence through the reference (bit-identical to the plain per-sequence path)."""

    def __init__(self, storage: KVStorage, q_heads: int, dtype: torch.dtype, device: torch.device) -> None:
        self.decode = ref.decode_attention_bf16
        self.on_cuda = device.type == "cuda"
        self.reason = "not on CUDA"
        head_dim = storage.layers[0].k_pages.shape[3]
        if self.on_cuda and head_dim in (64, 128, 256) and dtype in (torch.float16, torch.bfloat16):
            try:
                from cometserve.kernels import attention

                self.decode, self.reason = attention.decode_attention_bf16, "kernels"
            except ImportError as e:
                self.reason = f"kernels unavailable: {e}"
        self.flash = self.on_cuda and _flash_varlen_works(q_heads, storage.layers[0].k_pages.shape[1], head_dim,
                                                          dtype, device)

    @property
    def graph_safe(self) -> bool:
        return self.decode is not ref.decode_attention_bf16

    def attend(self, cache, m: AttentionMetadata, q, k, v, positions, scale: float, rotary) -> torch.Tensor:
        q, k = rotary(positions, q, k)
        psz = cache.page_size
        kp, vp = cache.k_pages, cache.v_pages
        page, off = m.slot_mapping // psz, m.slot_mapping % psz
        kp[page, :, off] = k.to(kp.dtype)  # [T, Hkv, D] into [num_pages, Hkv, P, D]
        vp[page, :, off] = v.to(vp.dtype)
        return _read_split(lambda m, q, k, v: self._read(cache, m, q, k, v, scale), m, q, k, v)

    def _read(self, cache, m: AttentionMetadata, q, k, v, scale: float) -> torch.Tensor:
        """Attention of q over the cache (k, v: the step's own new keys and values of m's sequences)."""
        psz, kp, vp = cache.page_size, cache.k_pages, cache.v_pages
        if m.is_decode:
            return self.decode(q, kp, vp, m.block_tables, m.context_lens, scale, m.max_context_len)
        if self.flash:
            if m.kv_slots is None:  # every chunk starts at 0: its own K/V is the whole context
                keys, values, cu_k, max_k = k.to(kp.dtype), v.to(vp.dtype), m.cu_seqlens_q, m.max_seqlen_q
            else:
                page, off = m.kv_slots // psz, m.kv_slots % psz
                keys, values, cu_k, max_k = kp[page, :, off], vp[page, :, off], m.cu_seqlens_k, m.max_context_len
            return torch.ops.aten._flash_attention_forward(
                q, keys.contiguous(), values.contiguous(), m.cu_seqlens_q, cu_k, m.max_seqlen_q, max_k, 0.0,
                True, False, scale=scale)[0]
        out = torch.empty_like(q)
        cu = m.cu_seqlens_host
        for b, (start, ctx) in enumerate(zip(m.start_pos_host, m.context_lens_host)):
            t0, t1 = cu[b], cu[b + 1]
            if start == 0:
                keys, values = k[t0:t1].to(kp.dtype), v[t0:t1].to(vp.dtype)
            else:
                pages = m.block_tables[b, : -(-ctx // psz)].long()
                keys = kp[pages].transpose(1, 2).reshape(-1, kp.shape[1], kp.shape[3])[:ctx]
                values = vp[pages].transpose(1, 2).reshape(-1, vp.shape[1], vp.shape[3])[:ctx]
            out[t0:t1] = self._attention(q[t0:t1], keys, values, start, scale)
        return out

    def _attention(self, q, keys, values, start: int, scale: float) -> torch.Tensor:
        """q [T, Hq, D] at positions start.. over keys/values [L, Hkv, D] (L = start + T)."""
        t = q.shape[0]
        if not self.on_cuda:  # the reference: bit-identical to the plain per-sequence path
            pos = torch.arange(start, start + t, device=q.device)
            return ref.attention(q, keys, values, pos, scale)
        qh, kh, vh = q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1)
        if start == 0:
            o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True)
        else:
            mask = torch.arange(keys.shape[0], device=q.device)[None, :] <= (start + torch.arange(t, device=q.device))[:, None]
            o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True)
        return o.transpose(0, 1)


def _flash_varlen_works(q_heads: int, kv_heads: int, head_dim: int, dtype, device) -> bool:
    """Whether PyTorch's bundled FlashAttention-2 varlen kernel runs here (bottom-right causal, GQA)."""
    try:
        q = torch.zeros(4, q_heads, head_dim, dtype=dtype, device=device)
        k = torch.zeros(6, kv_heads, head_dim, dtype=dtype, device=device)
        cu_q = torch.tensor([0, 1, 4], dtype=torch.int32, device=device)
        cu_k = torch.tensor([0, 2, 6], dtype=torch.int32, device=device)
        torch.ops.aten._flash_attention_forward(q, k, k, cu_q, cu_k, 3, 4, 0.0, True, False, scale=1.0)
        return True
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


class LayerView:
    """What the model's attention layer sees as its cache for this step."""

    __slots__ = ("cache", "meta", "ops")

    def __init__(self, cache, meta: AttentionMetadata, ops) -> None:
        self.cache, self.meta, self.ops = cache, meta, ops

    def attend(self, q, k, v, positions, scale: float, rotary) -> torch.Tensor:
        return self.ops.attend(self.cache, self.meta, q, k, v, positions, scale, rotary)


class StepCache:
    def __init__(self, storage: KVStorage, meta: AttentionMetadata, ops) -> None:
        self.layers = [LayerView(c, meta, ops) for c in storage.layers]
