"""Grammar-constrained decoding: a request's StructuredOutputsParams -> a matcher that says which
tokens may come next and follows the tokens sampled.

```
compiler = GrammarCompiler(tokenizer, vocab_size)      # one per engine: the vocabulary's index
matcher = compiler.matcher(params.structured_outputs, stop_ids=(eos,))
mask = matcher.allowed()       # bits of bool [vocab_size] (np.packbits): the sampler picks among these only
matcher.accept(token)          # after the sample; matcher.is_terminated: nothing may follow
```

Every spec compiles to a regex (JSON schemas through structured/json_schema.py), the regex to a
minimal byte DFA (structured/regex.py); a state's mask is one vectorized walk of the vocabulary
(structured/vocab.py), cached per state as packed bits (a step moves 16 KB a row for a 128k-token
vocabulary, not 128 KB), and compiled grammars are cached per spec, so a request that repeats a
schema pays neither again. The request's stop tokens are allowed exactly where the text so far is a
whole match.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from cometserve.sampling_params import StructuredOutputsParams
from cometserve.structured.regex import DFA, compile_regex
from cometserve.structured.vocab import TokenIndex, token_bytes

MAX_CACHED_MASKS = 4096  # per grammar: 4096 x vocab / 8 bytes (64 MB at 128k tokens) at most
MAX_CACHED_GRAMMARS = 32


class Grammar:
    """A compiled spec over one vocabulary: its DFA and the allowed-token mask of each state met."""

    def __init__(self, dfa: DFA, index: TokenIndex) -> None:
        self.dfa, self.index = dfa, index
        self._masks: dict[int, np.ndarray] = {}

    def has_mask(self, state: int) -> bool:
        return state in self._masks

    def mask(self, state: int) -> np.ndarray:
        """The state's allowed tokens as packed bits: uint8 [ceil(vocab / 8)] (np.packbits)."""
        m = self._masks.get(state)
        if m is None:
            if len(self._masks) >= MAX_CACHED_MASKS:
                self._masks.clear()
            m = self._masks[state] = np.packbits(self.index.allowed(self.dfa.trans, state))
        return m


class GrammarMatcher:
    """One request's position in its grammar."""

    def __init__(self, grammar: Grammar, stop_ids: tuple[int, ...]) -> None:
        self.grammar, self.stop_ids = grammar, stop_ids
        self.state = grammar.dfa.start

    def allowed(self) -> np.ndarray:
        """The tokens the next sample may be, as packed bits (unpack() for bool [vocab_size]); stop
        tokens where the text so far is a whole match."""
        mask = self.grammar.mask(self.state)
        if self.stop_ids and self.grammar.dfa.accepting[self.state]:
            mask = _with_bits(mask, self.stop_ids)
        return mask

    def accept(self, token_id: int) -> None:
        """Advance over a sampled token (a stop token ends the text: nothing to advance)."""
        if token_id in self.stop_ids:
            return
        data = self.grammar.index.tokens[token_id] if 0 <= token_id < self.grammar.index.vocab_size else None
        nxt = self.grammar.dfa.run(data, self.state) if data else 0
        if nxt == 0:
            raise ValueError(f"token {token_id} ({data!r}) does not continue the grammar")
        self.state = nxt

    @property
    def is_terminated(self) -> bool:
        """No token of the vocabulary can continue the text: it is complete (or, where the
        tokenizer cannot spell what the grammar needs, stuck), so the request ends here."""
        return not self.grammar.mask(self.state).any()

    @property
    def is_complete(self) -> bool:
        return bool(self.grammar.dfa.accepting[self.state])


class GrammarCompiler:
    """Specs -> grammars over one tokenizer's vocabulary (its index built at the first request).
    Thread-safe, and compilation holds no lock: a server compiles a request's grammar off the engine's
    thread, and the engine's thread, finding its grammars cached, never waits for another request's
    compilation (json_object's takes ~1.5 s)."""

    def __init__(self, tokenizer, vocab_size: int) -> None:
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self._index: TokenIndex | None = None
        self._grammars: OrderedDict[StructuredOutputsParams, Grammar] = OrderedDict()
        self._lock = threading.Lock()  # the cache
        self._index_lock = threading.Lock()  # the vocabulary's index, built once
        self._pool: ThreadPoolExecutor | None = None  # prefetch's, made at its first use

    def grammar(self, spec: StructuredOutputsParams) -> Grammar:
        """The compiled grammar of `spec`; ValueError (naming the problem) for a bad spec."""
        with self._lock:
            g = self._grammars.get(spec)
            if g is not None:
                self._grammars.move_to_end(spec)
                return g
        if self.tokenizer is None:
            raise ValueError("structured outputs need the model's tokenizer (none was loaded)")
        g = Grammar(compile_regex(spec.regex_pattern()), self._vocabulary())
        if not g.mask(g.dfa.start).any():
            raise ValueError("the structured output's first token cannot be spelled by this tokenizer")
        with self._lock:  # two threads may have compiled one spec: the first to get here is kept
            g = self._grammars.setdefault(spec, g)
            if len(self._grammars) > MAX_CACHED_GRAMMARS:
                self._grammars.popitem(last=False)
        return g

    def prefetch(self, matchers) -> None:
        """Compute the masks of the matchers' current states that are not cached yet, on a few
        threads: the vocabulary walk is numpy gathers, which release the GIL (2 threads on 2 cores
        took 16 new states from 34 to 22 ms), so a step where many requests reach new states waits
        for the slowest walk rather than their sum."""
        todo = {(id(m.grammar), m.state): m for m in matchers
                if isinstance(m, GrammarMatcher) and not m.grammar.has_mask(m.state)}
        if len(todo) < 2:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max(1, min(8, (os.cpu_count() or 2) // 2)), "cometserve-grammar")
        list(self._pool.map(lambda m: m.grammar.mask(m.state), todo.values()))

    def _vocabulary(self) -> TokenIndex:
        with self._index_lock:
            if self._index is None:
                self._index = TokenIndex(token_bytes(self.tokenizer, self.vocab_size))
            return self._index

    def matcher(self, spec: StructuredOutputsParams, stop_ids: tuple[int, ...]) -> GrammarMatcher:
        return GrammarMatcher(self.grammar(spec), stop_ids)


class FixedMask:
    """vLLM's allowed_token_ids: the same tokens at every step (EOS only if listed, as vLLM), the
    matcher interface of a grammar that never ends the request."""

    is_terminated = False

    def __init__(self, vocab_size: int, token_ids: tuple[int, ...]) -> None:
        if max(token_ids) >= vocab_size:
            raise ValueError(f"allowed_token_ids names token {max(token_ids)}, outside the vocabulary [0, {vocab_size})")
        self.mask = _with_bits(np.zeros((vocab_size + 7) // 8, dtype=np.uint8), token_ids)

    def allowed(self) -> np.ndarray:
        return self.mask

    def accept(self, token_id: int) -> None:
        """Nothing to follow."""


def constraint(params, compiler: GrammarCompiler, stop_ids: tuple[int, ...]) -> GrammarMatcher | FixedMask | None:
    """A request's constraint on its tokens (SamplingParams.structured_outputs or allowed_token_ids)."""
    if params.structured_outputs is not None:
        return compiler.matcher(params.structured_outputs, stop_ids)
    if params.allowed_token_ids is not None:
        return FixedMask(compiler.vocab_size, params.allowed_token_ids)
    return None


def _with_bits(packed: np.ndarray, token_ids) -> np.ndarray:
    """A copy of packed mask bits with these tokens' bits set (np.packbits' order: token 0 is the
    high bit of byte 0)."""
    out = packed.copy()
    ids = np.asarray(token_ids, dtype=np.int64)
    np.bitwise_or.at(out, ids >> 3, (0x80 >> (ids & 7)).astype(np.uint8))
    return out


def unpack(packed: np.ndarray, vocab_size: int) -> np.ndarray:
    """Packed mask bits -> bool [vocab_size]."""
    return np.unpackbits(packed, count=vocab_size).astype(bool)
