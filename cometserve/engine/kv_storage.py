"""KVStorage: the paged KV cache on the device, one cache per decoder layer, and its sequence slots.

Two layouts, chosen by the checkpoint's scheme (`kv_bits`):

- 4: `ref.PagedKVCache` (INT4 codes + float16 scale/zero per group of `kv_group_size` tokens, the
  newest partial group in a 16-bit window indexed by a per-sequence slot id; kernels/ref.py).
- 16: `Paged16Cache`, k/v pages [num_pages, Hkv, P, D] in the model dtype: the fair 16-bit baseline
  of the same engine.

Pages are what `KVBlockManager` hands out (block id = page id, block size = page size). One extra
page (`dummy_page`, id `num_pages`) and one extra window slot (`dummy_slot`, id `max_seqs`) exist
that the block manager never sees: padded rows of a CUDA-graph decode batch write and read there,
so padding never touches a live sequence.

The number of pages comes from a GPU memory fraction on CUDA (after the weights are loaded: free
memory x fraction / bytes per page) or is given (CPU, tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cometserve.kernels.ref import PagedKVCache


@dataclass
class Paged16Cache:
    """One layer's 16-bit paged cache: k_pages, v_pages [num_pages, Hkv, P, D]."""

    k_pages: torch.Tensor
    v_pages: torch.Tensor

    @property
    def page_size(self) -> int:
        return self.k_pages.shape[2]

    @classmethod
    def allocate(cls, num_pages: int, num_kv_heads: int, head_dim: int, page_size: int, dtype, device) -> Paged16Cache:
        shape = (num_pages, num_kv_heads, page_size, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))


def page_bytes(kv_bits: int, num_layers: int, num_kv_heads: int, head_dim: int, page_size: int,
               group_size: int, dtype: torch.dtype) -> int:
    """Device bytes of one page across all layers (K and V)."""
    if kv_bits == 16:
        return 2 * num_layers * num_kv_heads * page_size * head_dim * torch.finfo(dtype).bits // 8
    codes = 2 * num_kv_heads * page_size * head_dim // 2
    meta = 4 * num_kv_heads * (page_size // group_size) * head_dim * 2  # 4 float16 tensors
    return num_layers * (codes + meta)


def pages_for_memory(bytes_per_page: int, device: torch.device, memory_fraction: float,
                     reserve_bytes: int = 0) -> int:
    """Pages that fit in `memory_fraction` of the device's free memory, minus `reserve_bytes`
    (activations, CUDA graphs, logits)."""
    free, _total = torch.cuda.mem_get_info(device)
    usable = int(free * memory_fraction) - reserve_bytes
    if usable < bytes_per_page:
        raise RuntimeError(
            f"no room for the KV cache: {free / 2**30:.1f} GiB free x {memory_fraction} "
            f"- {reserve_bytes / 2**30:.1f} GiB reserved < one page of {bytes_per_page} bytes"
        )
    return usable // bytes_per_page


class SeqSlots:
    """Window slot ids 0..max_seqs-1, one per running request; lowest free first (deterministic)."""

    def __init__(self, max_seqs: int) -> None:
        self.max_seqs = max_seqs
        self._free = list(range(max_seqs - 1, -1, -1))  # a stack: pop() gives the lowest
        self._of: dict[str, int] = {}

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._of

    def __len__(self) -> int:
        return len(self._of)

    def get_or_assign(self, request_id: str) -> int:
        slot = self._of.get(request_id)
        if slot is None:
            if not self._free:
                raise RuntimeError(f"no free sequence slot for {request_id} ({self.max_seqs} in use)")
            slot = self._free.pop()
            self._of[request_id] = slot
        return slot

    def release(self, request_id: str) -> None:
        """Give the slot back (no-op for a request holding none: finished_ids may name such)."""
        slot = self._of.pop(request_id, None)
        if slot is not None:
            self._free.append(slot)
            self._free.sort(reverse=True)


class KVStorage:
    """Per-layer paged caches + sequence slots. `layers[i]` is a PagedKVCache or a Paged16Cache."""

    def __init__(self, layers: list, kv_bits: int, num_pages: int, page_size: int, max_seqs: int,
                 bytes_per_page: int) -> None:
        self.layers = layers
        self.kv_bits = kv_bits
        self.num_pages = num_pages  # usable pages: the block manager's num_blocks
        self.page_size = page_size
        self.max_seqs = max_seqs
        self.bytes_per_page = bytes_per_page
        self.slots = SeqSlots(max_seqs)

    @property
    def dummy_page(self) -> int:
        return self.num_pages

    @property
    def dummy_slot(self) -> int:
        return self.max_seqs

    @property
    def num_bytes(self) -> int:
        return self.bytes_per_page * (self.num_pages + 1)

    @classmethod
    def create(cls, model, kv_bits: int, kv_group_size: int, max_seqs: int, num_pages: int | None = None,
               page_size: int | None = None, memory_fraction: float = 0.9, reserve_bytes: int = 0) -> KVStorage:
        """Allocate the caches for `model` (an LlamaForCausalLM). `num_pages` None: size from
        `memory_fraction` of free CUDA memory."""
        cfg = model.config
        w = model.model.embed_tokens.weight
        dtype, device = w.dtype, w.device
        page_size = page_size or (kv_group_size if kv_bits == 4 else 64)
        if kv_bits == 4 and page_size % kv_group_size:
            raise ValueError(f"page size {page_size} must be a multiple of the KV group size {kv_group_size}")
        per_page = page_bytes(kv_bits, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, page_size,
                              kv_group_size, dtype)
        if num_pages is None:
            if device.type != "cuda":
                raise ValueError("num_pages is required off CUDA (no free-memory query)")
            num_pages = pages_for_memory(per_page, device, memory_fraction, reserve_bytes) - 1
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        layers = []
        for _ in range(cfg.num_layers):
            if kv_bits == 4:
                layers.append(PagedKVCache.allocate(num_pages + 1, cfg.num_kv_heads, cfg.head_dim, max_seqs + 1,
                                                    dtype, device, page_size, kv_group_size))
            else:
                layers.append(Paged16Cache.allocate(num_pages + 1, cfg.num_kv_heads, cfg.head_dim, page_size,
                                                    dtype, device))
        return cls(layers, kv_bits, num_pages, page_size, max_seqs, per_page)
