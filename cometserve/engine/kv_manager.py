"""KVBlockManager: which paged KV-cache block belongs to which request. Bookkeeping only.

The cache on the device (engine/kv_storage.py) is `num_blocks` pages of `block_size` token slots;
this class decides who owns each page and never touches a tensor, so it is exact, deterministic
and tested on CPU. Free blocks are handed out lowest id first (a heap): the same request stream
always produces the same block tables, which makes a scheduler test a list of literal block ids.

A request's table covers `num_tokens(request_id)` token slots: block `i` holds positions
`[i * block_size, (i + 1) * block_size)`, and a token's slot in the flat cache is
`block_id * block_size + offset`, which is what the K/V scatter kernel indexes.
"""

from __future__ import annotations

import heapq


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVBlockManager:
    """Free list plus per-request block tables over `num_blocks` blocks of `block_size` tokens."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive integer, got {num_blocks!r}")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks))  # a heap: ascending already
        self._owner: list[str | None] = [None] * num_blocks
        self._tables: dict[str, list[int]] = {}
        self._num_tokens: dict[str, int] = {}
        # immutable copies of _tables, made on first ask after a change: a decode step hands every
        # running request's table to the runner, and a table changes once per block_size tokens
        self._table_tuples: dict[str, tuple[int, ...]] = {}

    # ---- queries -------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks owned by some request, in [0, 1]."""
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
        return self.num_new_blocks(request_id, num_new_tokens) <= len(self._free)

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
        if need > len(self._free):
            return None
        table = self._tables.setdefault(request_id, [])
        new = [heapq.heappop(self._free) for _ in range(need)]
        for block in new:
            if self._owner[block] is not None:
                raise RuntimeError(f"block {block} handed to {request_id} is owned by {self._owner[block]}")
            self._owner[block] = request_id
        table.extend(new)
        self._table_tuples.pop(request_id, None)
        self._num_tokens[request_id] = have_tokens + num_new_tokens
        return new

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
        for block in table:
            if self._owner[block] != request_id:
                raise RuntimeError(f"block {block} in {request_id}'s table is owned by {self._owner[block]}")
            self._owner[block] = None
            heapq.heappush(self._free, block)
        return table

    # ---- checks --------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Every block is free exactly once or owned by exactly one table; tables fit their tokens."""
        free = set(self._free)
        if len(free) != len(self._free):
            raise RuntimeError("a block is on the free list twice")
        seen: set[int] = set()
        for rid, table in self._tables.items():
            if len(table) != self.blocks_for(self._num_tokens[rid]):
                raise RuntimeError(
                    f"request {rid}: {len(table)} blocks for {self._num_tokens[rid]} tokens "
                    f"(block_size {self.block_size})"
                )
            for block in table:
                if block in seen or block in free:
                    raise RuntimeError(f"block {block} owned twice (request {rid})")
                if self._owner[block] != rid:
                    raise RuntimeError(f"block {block} in {rid}'s table but owner says {self._owner[block]}")
                seen.add(block)
        if len(seen) + len(free) != self.num_blocks:
            raise RuntimeError(f"{self.num_blocks - len(seen) - len(free)} blocks neither free nor owned")
        if set(self._tables) != set(self._num_tokens):
            raise RuntimeError("block tables and token counts name different requests")

    def _table(self, request_id: str) -> list[int]:
        try:
            return self._tables[request_id]
        except KeyError:
            raise KeyError(f"request {request_id} holds no KV blocks") from None
