"""KVBlockManager: which paged KV-cache block belongs to which request. Bookkeeping only.

The cache on the device (engine/kv_storage.py) is `num_blocks` pages of `block_size` token slots;
this class decides who owns each page and never touches a tensor, so it is exact, deterministic
and tested on CPU. Free blocks are handed out lowest id first (a heap): the same request stream
always produces the same block tables, which makes a scheduler test a list of literal block ids.

A request's table covers `num_tokens(request_id)` token slots: block `i` holds positions
`[i * block_size, (i + 1) * block_size)`, and a token's slot in the flat cache is
`block_id * block_size + offset`, which is what the K/V scatter kernel indexes.

Prefix caching (`enable_prefix_caching`): a full block whose K/V has been written can be
`register`ed under a content key (`block_keys`: a hash chain over the token ids of the blocks up to
and including it). A new request whose leading blocks' keys are registered starts its table with
those blocks (`allocate_prefix`), shared read-only: a full block is never written again, and in the
INT4 cache a full page is whole quantization groups (page size = a multiple of the group size), so
nothing of it lives in a sequence's 16-bit window. Blocks count their tables (`_ref`); a registered
block no table holds stays cached but idle, and is reused, oldest-freed first, only when the free
list is empty. Without registration (caching off) every freed block goes straight back to the free
list: the exact behaviour and block ids of a plain allocator.
"""

from __future__ import annotations

import hashlib
import heapq
from array import array
from collections import OrderedDict


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def block_keys(token_ids: list[int], block_size: int, parent: bytes = b"") -> list[bytes]:
    """Content keys of the full blocks of `token_ids` (a continuation after a block keyed `parent`):
    key i = blake2b-128(key i-1 + the block's token ids), so equal keys mean equal prefixes."""
    keys = []
    for i in range(len(token_ids) // block_size):
        ids = array("q", token_ids[i * block_size:(i + 1) * block_size]).tobytes()
        parent = hashlib.blake2b(parent + ids, digest_size=16).digest()
        keys.append(parent)
    return keys


class KVBlockManager:
    """Free list plus per-request block tables over `num_blocks` blocks of `block_size` tokens."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False) -> None:
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive integer, got {num_blocks!r}")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._free: list[int] = list(range(num_blocks))  # a heap: ascending already
        self._ref: list[int] = [0] * num_blocks  # tables holding each block
        self._key: list[bytes | None] = [None] * num_blocks  # content key of a registered block
        self._cached: dict[bytes, int] = {}  # content key -> registered block
        self._idle: OrderedDict[int, None] = OrderedDict()  # registered, in no table: oldest freed first
        self._tables: dict[str, list[int]] = {}
        self._num_tokens: dict[str, int] = {}
        # immutable copies of _tables, made on first ask after a change: a decode step hands every
        # running request's table to the runner, and a table changes once per block_size tokens
        self._table_tuples: dict[str, tuple[int, ...]] = {}

    # ---- queries -------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take: free ones and cached ones no table holds."""
        return len(self._free) + len(self._idle)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Registered blocks (held by tables or idle)."""
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by some request, in [0, 1]."""
        return self.num_used_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` token slots."""
        return cdiv(num_tokens, self.block_size)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._tables

    def block_table(self, request_id: str) -> list[int]:
        """A copy of the request's block ids, in position order."""
        return list(self._table(request_id))

    def table_tuple(self, request_id: str) -> tuple[int, ...]:
        """The request's block ids as a tuple, the same object until its table next changes."""
        table = self._table_tuples.get(request_id)
        if table is None:
            table = self._table_tuples[request_id] = tuple(self._table(request_id))
        return table

    def num_tokens(self, request_id: str) -> int:
        """Token slots the request's table covers (0 for a request holding nothing)."""
        return self._num_tokens.get(request_id, 0)

    def num_new_blocks(self, request_id: str | None, num_new_tokens: int) -> int:
        """Blocks `allocate(request_id, num_new_tokens)` would take from the free list."""
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        have_tokens = self._num_tokens.get(request_id, 0) if request_id is not None else 0
        have_blocks = len(self._tables.get(request_id, ())) if request_id is not None else 0
        return self.blocks_for(have_tokens + num_new_tokens) - have_blocks

    def can_allocate(self, num_new_tokens: int, request_id: str | None = None) -> bool:
        """Whether `num_new_tokens` more tokens fit for `request_id` (None: a request holding nothing)."""
        return self.num_new_blocks(request_id, num_new_tokens) <= self.num_free_blocks

    def cached_prefix(self, keys: list[bytes]) -> list[int]:
        """The registered blocks of the longest leading run of `keys` (block_keys of a sequence)."""
        out = []
        for key in keys:
            block = self._cached.get(key)
            if block is None:
                break
            out.append(block)
        return out

    def slots(self, request_id: str, start: int, end: int) -> list[int]:
        """Flat cache slots of positions [start, end): block_id * block_size + offset."""
        if not 0 <= start <= end <= self.num_tokens(request_id):
            raise IndexError(
                f"request {request_id}: slots [{start}, {end}) outside its {self.num_tokens(request_id)} tokens"
            )
        table, bs = self._table(request_id), self.block_size
        return [table[pos // bs] * bs + pos % bs for pos in range(start, end)]

    # ---- mutations -----------------------------------------------------------------------

    def allocate(self, request_id: str, num_new_tokens: int) -> list[int] | None:
        """Grow the request's table to cover `num_new_tokens` more tokens.

        Returns the newly taken block ids (empty when the last block has room), or None, changing
        nothing, when the free list is too short: all or nothing, so a failed attempt never leaves
        a half-grown table for the scheduler to undo.
        """
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        have_tokens = self._num_tokens.get(request_id, 0)
        table = self._tables.get(request_id)
        if table is not None and have_tokens + num_new_tokens <= len(table) * self.block_size:
            # the blocks it holds have room: almost every decode of every running request
            self._num_tokens[request_id] = have_tokens + num_new_tokens
            return []
        need = self.num_new_blocks(request_id, num_new_tokens)
        if need > self.num_free_blocks:
            return None
        table = self._tables.setdefault(request_id, [])
        new = [self._take() for _ in range(need)]
        table.extend(new)
        self._table_tuples.pop(request_id, None)
        self._num_tokens[request_id] = have_tokens + num_new_tokens
        return new

    def allocate_prefix(self, request_id: str, blocks: list[int], num_new_tokens: int) -> list[int] | None:
        """Start a new request's table with the cached `blocks` (from cached_prefix: their tokens are
        computed), then grow it by `num_new_tokens` as allocate() does. None, changing nothing, when
        the new tokens' blocks do not fit."""
        if request_id in self._tables:
            raise ValueError(f"request {request_id} already holds KV blocks")
        idle = sum(1 for b in blocks if self._ref[b] == 0)
        need = self.blocks_for(len(blocks) * self.block_size + num_new_tokens) - len(blocks)
        if need > self.num_free_blocks - idle:
            return None
        for block in blocks:
            if self._key[block] is None:
                raise RuntimeError(f"block {block} attached to {request_id} is not a cached block")
            if self._ref[block] == 0:
                del self._idle[block]
            self._ref[block] += 1
        self._tables[request_id] = list(blocks)
        self._num_tokens[request_id] = len(blocks) * self.block_size
        return self.allocate(request_id, num_new_tokens)

    def register(self, request_id: str, index: int, key: bytes) -> None:
        """Block `index` of the request's table is full and written: cache it under `key` (no-op if
        it is cached already, or another block holds that content)."""
        block = self._table(request_id)[index]
        if (index + 1) * self.block_size > self._num_tokens[request_id]:
            raise ValueError(f"request {request_id}: block {index} is not full")
        if self._key[block] is None and key not in self._cached:
            self._key[block] = key
            self._cached[key] = block

    def _take(self) -> int:
        """A block for a table: the lowest free id, else the oldest idle cached block (uncached)."""
        if self._free:
            block = heapq.heappop(self._free)
        else:
            block, _ = self._idle.popitem(last=False)
            del self._cached[self._key[block]]
            self._key[block] = None
        if self._ref[block]:
            raise RuntimeError(f"block {block} taken from the free list is held by {self._ref[block]} tables")
        self._ref[block] = 1
        return block

    def free(self, request_id: str) -> list[int]:
        """Return all of the request's blocks to the free list; returns them in table order.

        Freeing a request that holds nothing raises: it means two code paths think they own the
        request's end of life (the double free this class exists to catch).
        """
        if request_id not in self._tables:
            raise ValueError(f"request {request_id} holds no KV blocks (double free?)")
        table = self._tables.pop(request_id)
        del self._num_tokens[request_id]
        self._table_tuples.pop(request_id, None)
        for block in reversed(table):  # the tail goes idle first: evicted before the shared head
            if self._ref[block] < 1:
                raise RuntimeError(f"block {block} in {request_id}'s table is held by no table")
            self._ref[block] -= 1
            if self._ref[block] == 0:
                if self._key[block] is None:
                    heapq.heappush(self._free, block)
                else:
                    self._idle[block] = None
        return table

    # ---- checks --------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Every block is free, idle-cached or held, exactly one of them; reference counts equal the
        tables holding each block; only cached blocks are shared; tables fit their tokens."""
        free = set(self._free)
        if len(free) != len(self._free):
            raise RuntimeError("a block is on the free list twice")
        held = [0] * self.num_blocks
        for rid, table in self._tables.items():
            if len(table) != self.blocks_for(self._num_tokens[rid]):
                raise RuntimeError(
                    f"request {rid}: {len(table)} blocks for {self._num_tokens[rid]} tokens "
                    f"(block_size {self.block_size})"
                )
            if len(set(table)) != len(table):
                raise RuntimeError(f"request {rid}: a block twice in its table")
            for block in table:
                held[block] += 1
        cached = set(self._cached.values())
        for block in range(self.num_blocks):
            where = (block in free) + (block in self._idle) + (held[block] > 0)
            if where != 1:
                raise RuntimeError(f"block {block}: free {block in free}, idle {block in self._idle}, "
                                   f"in {held[block]} tables")
            if held[block] != self._ref[block]:
                raise RuntimeError(f"block {block} is in {held[block]} tables but counts {self._ref[block]} "
                                   "(owned twice?)")
            if held[block] > 1 and self._key[block] is None:
                raise RuntimeError(f"block {block} is shared by {held[block]} tables but not cached (owned twice)")
            if (self._key[block] is None) != (block not in cached) or (block in free and block in cached):
                raise RuntimeError(f"block {block}: its key and the cache disagree")
        if any(self._cached[k] != b or self._key[b] != k for k, b in self._cached.items()):
            raise RuntimeError("the content-key map and the blocks' keys disagree")
        if set(self._tables) != set(self._num_tokens):
            raise RuntimeError("block tables and token counts name different requests")

    def _table(self, request_id: str) -> list[int]:
        try:
            return self._tables[request_id]
        except KeyError:
            raise KeyError(f"request {request_id} holds no KV blocks") from None
