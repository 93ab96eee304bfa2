"""A tokenizer's vocabulary as byte strings, indexed so that a DFA state's allowed tokens come from
one vectorized walk.

Grammars run on bytes (structured/regex.py); tokens are pieces of bytes in three spellings:
byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM2: each byte drawn as a printable character),
SentencePiece (Llama 2, Mistral: "▁" for a space, "<0x0A>" for a byte the vocabulary lacks), and
anything else, decoded token by token. Special tokens (EOS, chat markers) have no bytes: a grammar
never allows them; the matcher allows the request's stop tokens where the grammar may end.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

import numpy as np

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable character table, inverted: printable Latin-1 bytes stand for
    themselves, the other bytes for the characters from U+0100 on, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def _decoder_kinds(tokenizer) -> set[str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set()
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    kinds, todo = set(), [decoder]
    while todo:
        d = todo.pop()
        kinds.add(d.get("type"))
        todo += d.get("decoders") or []
    return kinds


def token_bytes(tokenizer, vocab_size: int) -> list[bytes | None]:
    """Each token id's bytes in generated text, for ids [0, vocab_size); None for special tokens
    and ids the tokenizer does not know (an embedding padded past the vocabulary)."""
    n = min(len(tokenizer), vocab_size)
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    special = set(tokenizer.all_special_ids)
    special.update(i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special)
    kinds = _decoder_kinds(tokenizer)
    out: list[bytes | None] = [None] * vocab_size
    if "ByteLevel" in kinds:
        table = _byte_level_decoder()
        for i, p in enumerate(pieces):
            if i not in special and p is not None:
                try:
                    out[i] = bytes(table[c] for c in p)
                except KeyError:  # an added token spelled in plain text
                    out[i] = p.encode("utf-8")
    elif "ByteFallback" in kinds or "Metaspace" in kinds or any(p and "\u2581" in p for p in pieces[:1000]):
        for i, p in enumerate(pieces):
            if i not in special and p is not None:
                m = _BYTE_TOKEN.fullmatch(p)
                out[i] = bytes([int(m.group(1), 16)]) if m else p.replace("\u2581", " ").encode("utf-8")
    else:
        for i in range(n):
            text = tokenizer.decode([i]) if i not in special else ""
            out[i] = text.encode("utf-8") if text and "\ufffd" not in text else None
    return [b if b else None for b in out]


class TokenIndex:
    """The vocabulary sorted by byte length, longest first, as columns: column j holds byte j of
    every token longer than j. A DFA walks all tokens at once, one column per step, so a state's
    allowed-token mask costs one gather per vocabulary byte (numpy), not a Python loop per token."""

    def __init__(self, tokens: list[bytes | None]) -> None:
        self.vocab_size = len(tokens)
        lengths = np.array([len(t) if t else 0 for t in tokens], dtype=np.int64)
        self.order = np.argsort(-lengths, kind="stable")
        n = int((lengths > 0).sum())
        self.order = self.order[:n]  # tokens with bytes
        sorted_lengths = lengths[self.order]
        self.columns: list[np.ndarray] = []
        width = int(sorted_lengths[0]) if n else 0
        padded = np.zeros((n, width), dtype=np.int64)
        for row, tid in enumerate(self.order):
            padded[row, : sorted_lengths[row]] = np.frombuffer(tokens[tid], dtype=np.uint8)
        for j in range(width):
            count = int((sorted_lengths > j).sum())
            self.columns.append(np.ascontiguousarray(padded[:count, j]))
        self.tokens = tokens
        # rows by their first byte: a state that takes few first bytes starts from those tokens only
        first = self.columns[0] if self.columns else np.zeros(0, dtype=np.int64)
        self.by_first = [np.flatnonzero(first == b) for b in range(256)]
        self.first_counts = np.array([len(r) for r in self.by_first])

    def allowed(self, trans: np.ndarray, state: int) -> np.ndarray:
        """bool [vocab_size]: the tokens whose bytes, read from `state`, do not reach the dead
        state 0 of the transition table `trans` (int32 [num_states, 256])."""
        flat = trans.reshape(-1)
        mask = np.zeros(self.vocab_size, dtype=bool)
        if not self.columns:
            return mask
        cur = np.full(len(self.columns[0]), state, dtype=np.int64)
        rows = None  # the tokens still alive, as rows of the sorted order (None: all of them)
        first = np.flatnonzero(trans[state])
        if self.first_counts[first].sum() * 2 < len(cur):  # few tokens start with a byte the state takes
            rows = np.sort(np.concatenate([self.by_first[b] for b in first])) if len(first) else np.zeros(0, np.int64)
            cur = trans[state, self.columns[0][rows]].astype(np.int64)
        for j, col in enumerate(self.columns):
            if j == 0 and rows is not None:
                continue
            if rows is None:
                head = cur[: len(col)]
                head[:] = flat[head * 256 + col]
                if (head == 0).mean() > 0.5:  # most are dead: go on with the survivors only
                    rows = np.flatnonzero(cur)
                    cur = cur[rows]
            else:
                n = np.searchsorted(rows, len(col))  # survivors long enough for this column
                cur[:n] = flat[cur[:n] * 256 + col[rows[:n]]]
                if n and (cur[:n] == 0).mean() > 0.5:
                    keep = cur != 0
                    rows, cur = rows[keep], cur[keep]
        if rows is None:
            mask[self.order] = cur != 0
        else:
            mask[self.order[rows[cur != 0]]] = True
        return mask
