"""Regular expression -> minimal DFA over UTF-8 bytes: the automaton structured outputs run.

Tokens are byte strings (a byte-level BPE token may hold half of a character), so the automaton
reads bytes: a character class becomes the UTF-8 byte sequences of its code points (the split
into byte ranges that regex engines use for UTF-8 automata), then Thompson's construction, the
subset construction over byte equivalence classes, and Moore's partition refinement.

Dialect (a subset of Python's `re`, matched against the whole text): literals and escapes
(`\\n \\t \\r \\f \\v \\0 \\xHH \\uXXXX`, escaped metacharacters), `\\d \\w \\s` and their
negations (ASCII meanings), classes `[...]` / `[^...]` with ranges, `.` (any character but a
newline), groups `(...)` `(?:...)`, `|`, and greedy `* + ? {n} {n,} {n,m}` (a lazy `?` suffix
is accepted: it only changes which match a backtracking engine reports, not the language). A
leading `^` and a trailing `$` are dropped. Anything else (backreferences, lookaround, flags,
anchors inside) is a RegexError that names the position.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import numpy as np

MAX_CODE_POINT = 0x10FFFF
MAX_REPEAT = 1000  # {n,m} copies the sub-automaton: bounded so that a pattern cannot exhaust memory
MAX_NFA_STATES = 400_000
MAX_DFA_STATES = 100_000  # a pattern like (a|b)*a(a|b){20} needs 2^20: refused, not computed for minutes
MAX_REFINE_ROUNDS = 64  # minimization rounds before the DFA is kept unminimized (see _minimize)
_SURROGATES = (0xD800, 0xDFFF)  # not characters: UTF-8 cannot encode them

_DIGIT = [(0x30, 0x39)]
_WORD = [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)]
_SPACE = [(0x09, 0x0D), (0x20, 0x20)]
_CLASS_ESCAPES = {"d": _DIGIT, "w": _WORD, "s": _SPACE}
_CHAR_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "0": "\0", "a": "\a"}


class RegexError(ValueError):
    """A pattern outside the supported dialect, or one too large to compile."""


# ---- parsing: pattern -> AST of code point sets ----------------------------------------------
# ("set", ranges) | ("cat", [nodes]) | ("alt", [nodes]) | ("rep", node, min, max or None)


def _normalize(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, merged, surrogates removed."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        for a, b in ((lo, min(hi, _SURROGATES[0] - 1)), (max(lo, _SURROGATES[1] + 1), hi)):
            if a > b:
                continue
            if out and a <= out[-1][1] + 1:
                out[-1] = (out[-1][0], max(out[-1][1], b))
            else:
                out.append((a, b))
    return out


def _negate(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out, nxt = [], 0
    for lo, hi in _normalize(ranges):
        if lo > nxt:
            out.append((nxt, lo - 1))
        nxt = hi + 1
    if nxt <= MAX_CODE_POINT:
        out.append((nxt, MAX_CODE_POINT))
    return _normalize(out)


class _Parser:
    def __init__(self, pattern: str) -> None:
        self.p, self.i = pattern, 0

    def error(self, what: str) -> RegexError:
        return RegexError(f"regex {self.p!r}: {what} at position {self.i}")

    def peek(self) -> str | None:
        return self.p[self.i] if self.i < len(self.p) else None

    def take(self) -> str:
        if self.i >= len(self.p):
            raise self.error("unexpected end of pattern")
        self.i += 1
        return self.p[self.i - 1]

    def parse(self):
        if self.p.startswith("^"):
            self.i = 1
        node = self.alternation()
        if self.i != len(self.p):
            raise self.error(f"unexpected {self.p[self.i]!r}")
        return node

    def alternation(self):
        branches = [self.sequence()]
        while self.peek() == "|":
            self.i += 1
            branches.append(self.sequence())
        return branches[0] if len(branches) == 1 else ("alt", branches)

    def sequence(self):
        items = []
        while (c := self.peek()) is not None and c not in "|)":
            if c == "$" and self.i == len(self.p) - 1:
                self.i += 1
                break
            items.append(self.quantified(self.atom()))
        return ("cat", items)

    def atom(self):
        c = self.take()
        if c == "(":
            if self.p.startswith("?:", self.i):
                self.i += 2
            elif self.peek() == "?":
                raise self.error("group flags and lookaround are not supported")
            node = self.alternation()
            if self.peek() != ")":
                raise self.error("missing )")
            self.i += 1
            return node
        if c == "[":
            return ("set", self.char_class())
        if c == ".":
            return ("set", _negate([(0x0A, 0x0A)]))
        if c == "\\":
            return ("set", self.escape(in_class=False))
        if c in "*+?":
            raise self.error(f"nothing to repeat before {c!r}")
        if c in "^$":
            raise self.error(f"anchor {c!r} inside the pattern is not supported")
        return ("set", [(ord(c), ord(c))])

    def escape(self, in_class: bool) -> list[tuple[int, int]]:
        c = self.take()
        if c.lower() in _CLASS_ESCAPES:
            ranges = _CLASS_ESCAPES[c.lower()]
            return _negate(ranges) if c.isupper() else ranges
        if c in _CHAR_ESCAPES:
            return [(ord(_CHAR_ESCAPES[c]),) * 2]
        if c in "xu":
            n = 2 if c == "x" else 4
            digits = self.p[self.i:self.i + n]
            if len(digits) != n or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise self.error(f"\\{c} needs {n} hex digits")
            self.i += n
            return [(int(digits, 16),) * 2]
        if c == "b" and in_class:
            return [(8, 8)]
        if c.isalnum():
            raise self.error(f"escape \\{c} is not supported")
        return [(ord(c), ord(c))]

    def char_class(self) -> list[tuple[int, int]]:
        negated = self.peek() == "^"
        self.i += negated
        ranges: list[tuple[int, int]] = []
        first = True
        while first or self.peek() != "]":
            first = False
            lo = self.class_item()
            if self.peek() == "-" and self.p[self.i + 1:self.i + 2] not in ("]", ""):
                self.i += 1
                hi = self.class_item()
                if len(lo) != 1 or len(hi) != 1 or lo[0][0] != lo[0][1] or hi[0][0] != hi[0][1]:
                    raise self.error("a class range needs single characters at both ends")
                if hi[0][0] < lo[0][0]:
                    raise self.error("a class range ends before it starts")
                ranges.append((lo[0][0], hi[0][0]))
            else:
                ranges += lo
        self.i += 1
        return _negate(ranges) if negated else _normalize(ranges)

    def class_item(self) -> list[tuple[int, int]]:
        c = self.take()
        if c == "\\":
            return self.escape(in_class=True)
        if c == "[" and self.peek() == ":":
            raise self.error("POSIX classes are not supported")
        return [(ord(c), ord(c))]

    def quantified(self, node):
        while (c := self.peek()) is not None and c in "*+?{":
            if c == "{":
                bounds = self.braces()
                if bounds is None:
                    break
                lo, hi = bounds
            else:
                self.i += 1
                lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
            if self.peek() == "?":  # lazy: same language
                self.i += 1
            node = ("rep", node, lo, hi)
        return node

    def braces(self) -> tuple[int, int | None] | None:
        """{n}, {n,}, {n,m}; None (a literal '{') where Python's re would read it as one."""
        end = self.p.find("}", self.i)
        body = self.p[self.i + 1:end] if end > 0 else ""
        lo, sep, hi = body.partition(",")
        lo = lo or ("0" if sep and hi else "")  # {,m}: as {0,m}
        if not lo.isdigit() or (hi and not hi.isdigit()):
            return None
        self.i = end + 1
        bounds = (int(lo), int(hi) if hi else (None if sep else int(lo)))
        if bounds[1] is not None and bounds[1] < bounds[0]:
            raise self.error(f"repeat {{{body}}} has its maximum below its minimum")
        if max(bounds[0], bounds[1] or 0) > MAX_REPEAT:
            raise self.error(f"repeat counts above {MAX_REPEAT} are not supported")
        return bounds


# ---- code points -> UTF-8 byte ranges --------------------------------------------------------


def _utf8(cp: int) -> bytes:
    return chr(cp).encode("utf-8", "surrogatepass")


def utf8_sequences(lo: int, hi: int) -> list[list[tuple[int, int]]]:
    """The code points [lo, hi] as sequences of byte ranges, each sequence one encoded length:
    every byte string a sequence matches encodes a code point of the range, and each code point
    is matched by exactly one sequence."""
    out, stack = [], [(lo, hi)]
    while stack:
        lo, hi = stack.pop()
        split = next((b for b in (0x7F, 0x7FF, 0xFFFF) if lo <= b < hi), None)
        if split is not None:  # one encoded length per piece
            stack += [(split + 1, hi), (lo, split)]
            continue
        n = len(_utf8(lo))
        for k in range(1, n):  # make the trailing k continuation bytes span whole 6-bit ranges
            m = (1 << (6 * k)) - 1
            if lo & ~m != hi & ~m:
                if lo & m:
                    stack += [((lo | m) + 1, hi), (lo, lo | m)]
                    break
                if hi & m != m:
                    stack += [(hi & ~m, hi), (lo, (hi & ~m) - 1)]
                    break
        else:
            out.append(list(zip(_utf8(lo), _utf8(hi))))
    return out


# ---- Thompson NFA over bytes -----------------------------------------------------------------


class _NFA:
    def __init__(self) -> None:
        self.eps: list[list[int]] = []
        self.edges: list[list[tuple[int, int, int]]] = []  # (byte lo, byte hi, target)

    def state(self) -> int:
        if len(self.eps) >= MAX_NFA_STATES:
            raise RegexError(f"the pattern needs more than {MAX_NFA_STATES} automaton states")
        self.eps.append([])
        self.edges.append([])
        return len(self.eps) - 1

    def build(self, node) -> tuple[int, int]:
        """A fragment for `node`: (entry, exit) states."""
        kind = node[0]
        if kind == "set":
            start, end = self.state(), self.state()
            for lo, hi in node[1]:
                for seq in utf8_sequences(lo, hi):
                    cur = start
                    for j, (a, b) in enumerate(seq):
                        nxt = end if j == len(seq) - 1 else self.state()
                        self.edges[cur].append((a, b, nxt))
                        cur = nxt
            return start, end
        if kind == "cat":
            start = end = self.state()
            for child in node[1]:
                s, e = self.build(child)
                self.eps[end].append(s)
                end = e
            return start, end
        if kind == "alt":
            start, end = self.state(), self.state()
            for child in node[1]:
                s, e = self.build(child)
                self.eps[start].append(s)
                self.eps[e].append(end)
            return start, end
        _, child, lo, hi = node
        start = end = self.state()
        for _ in range(lo):  # mandatory copies
            s, e = self.build(child)
            self.eps[end].append(s)
            end = e
        if hi is None:  # then a loop
            s, e = self.build(child)
            self.eps[end].append(s)
            self.eps[e].append(s)
            out = self.state()
            self.eps[end].append(out)
            self.eps[e].append(out)
            return start, out
        out = self.state()
        self.eps[end].append(out)
        for _ in range(hi - lo):  # optional copies, each may end the repeat
            s, e = self.build(child)
            self.eps[end].append(s)
            end = e
            self.eps[end].append(out)
        return start, out


# ---- DFA -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DFA:
    """`trans[s, byte]` -> next state; state 0 is dead (no match can follow), `start` the initial
    state; `accepting[s]`: the bytes read so far are a full match. Every state but 0 can still
    reach an accepting one (pruned), so "not dead" means "a prefix of some match"."""

    trans: np.ndarray  # int32 [num_states, 256]
    accepting: np.ndarray  # bool [num_states]
    start: int

    @property
    def num_states(self) -> int:
        return self.trans.shape[0]

    def run(self, data: bytes, state: int | None = None) -> int:
        s = self.start if state is None else state
        for b in data:
            s = int(self.trans[s, b])
        return s

    def matches(self, text: str) -> bool:
        return bool(self.accepting[self.run(text.encode("utf-8"))])


def parse(pattern: str):
    """The pattern's syntax tree; RegexError where it leaves the dialect."""
    return _Parser(pattern).parse()


def compile_regex(pattern: str) -> DFA:
    """`pattern` (the dialect above) -> its minimal DFA over UTF-8 bytes."""
    nfa = _NFA()
    start, accept = nfa.build(parse(pattern))
    trans, accepting, byte_class = _determinize(nfa, start, accept)
    small = _minimize(trans, accepting)
    return DFA(small.trans[:, byte_class], small.accepting, small.start)


def _determinize(nfa: _NFA, start: int, accept: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Subset construction over byte classes (the 256 bytes cut where some edge range starts or
    ends: bytes of one class go the same way everywhere). A DFA state is the set of NFA states
    that read a byte or accept (the epsilon-only ones do not change what follows). Row 0 is the
    dead state, row 1 the start. Returns (transitions [states, classes], accepting, byte -> class)."""
    cuts = {0, 256}
    for edges in nfa.edges:
        for a, b, _ in edges:
            cuts.update((a, b + 1))
    bounds = sorted(cuts)
    byte_class = np.zeros(256, dtype=np.int64)
    for k, (a, b) in enumerate(pairwise(bounds)):
        byte_class[a:b] = k
    # per NFA state: (class, target) for every class its edges cover
    moves = [[(k, t) for a, b, t in edges for k in range(int(byte_class[a]), int(byte_class[b]) + 1)]
             for edges in nfa.edges]
    memo: dict[int, frozenset[int]] = {}

    def closure(s: int) -> frozenset[int]:
        c = memo.get(s)
        if c is None:
            seen, todo = {s}, [s]
            while todo:
                for t in nfa.eps[todo.pop()]:
                    if t not in seen:
                        seen.add(t)
                        todo.append(t)
            c = memo[s] = frozenset(x for x in seen if moves[x] or x == accept)
        return c

    sets = [frozenset(), closure(start)]
    ids = {sets[0]: 0, sets[1]: 1}
    rows = [[0] * (len(bounds) - 1)]
    i = 1
    while i < len(sets):
        targets: dict[int, set[int]] = {}
        for s in sets[i]:
            for k, t in moves[s]:
                targets.setdefault(k, set()).update(closure(t))
        row = [0] * (len(bounds) - 1)
        for k, states in targets.items():
            key = frozenset(states)
            if key not in ids:
                if len(sets) >= MAX_DFA_STATES:
                    raise RegexError(f"the pattern needs more than {MAX_DFA_STATES} automaton states "
                                     "(a repeat after an alternation multiplies them): simplify it")
                ids[key] = len(sets)
                sets.append(key)
            row[k] = ids[key]
        rows.append(row)
        i += 1
    return np.asarray(rows, dtype=np.int32), np.array([accept in s for s in sets]), byte_class


def _live(trans: np.ndarray, accepting: np.ndarray) -> np.ndarray:
    """bool [states]: some path leads to acceptance (a search back from the accepting states over
    the reversed edges, a frontier at a time)."""
    num_states, num_classes = trans.shape
    sources = np.repeat(np.arange(num_states), num_classes)
    order = np.argsort(trans.reshape(-1), kind="stable")
    preds = sources[order]  # predecessors grouped by target
    starts = np.searchsorted(trans.reshape(-1)[order], np.arange(num_states + 1))
    live = accepting.copy()
    frontier = np.flatnonzero(live)
    while len(frontier):
        lo, hi = starts[frontier], starts[frontier + 1]
        idx = np.repeat(lo - np.cumsum(np.concatenate([[0], (hi - lo)[:-1]])), hi - lo) + np.arange((hi - lo).sum())
        found = np.unique(preds[idx])
        frontier = found[~live[found]]
        live[frontier] = True
    live[0] = False
    return live


def _minimize(trans: np.ndarray, accepting: np.ndarray) -> DFA:
    """Prune states that cannot reach acceptance into the dead state, then merge equivalent
    states (Moore's refinement, vectorized); the dead state stays 0, the start 1. Refinement costs
    a pass over the table per round, and long chains of states (a repeat like {20,} of a large
    pattern) take hundreds of rounds: past MAX_REFINE_ROUNDS the automaton stays as the subset
    construction made it (correct, only more states to cache masks for)."""
    live = _live(trans, accepting)
    trans = np.where(live[trans], trans, 0)
    if not live[1]:
        raise RegexError("the pattern matches nothing")
    # partition: dead alone, then by acceptance; refine by the blocks of the successors
    block = np.where(live, 1 + accepting.astype(np.int64), 0)
    num_blocks = len(np.unique(block))
    for _ in range(MAX_REFINE_ROUNDS):
        sig = np.concatenate([block[:, None], block[trans]], axis=1)
        new = _row_ids(sig)
        if new.max() + 1 == num_blocks:
            return _renumbered(trans, accepting, block)
        block, num_blocks = new, int(new.max()) + 1
    return _renumbered(trans, accepting, np.where(live, np.arange(len(trans)), 0))  # not converged: unmerged


def _renumbered(trans: np.ndarray, accepting: np.ndarray, block: np.ndarray) -> DFA:
    """The DFA of a partition `block` (state -> block id) of equivalent states: dead -> 0, start ->
    1, the rest in order of first appearance."""
    order = [block[0], block[1]] + [b for b in dict.fromkeys(block.tolist()) if b not in (block[0], block[1])]
    remap = np.empty(int(block.max()) + 1, dtype=np.int32)
    remap[np.asarray(order)] = np.arange(len(order), dtype=np.int32)
    reps = np.zeros(len(order), dtype=np.int64)
    reps[remap[block]] = np.arange(len(block))  # any member represents its block
    return DFA(remap[block[trans[reps]]], accepting[reps], start=1)


def _row_ids(rows: np.ndarray) -> np.ndarray:
    """Equal rows -> equal ids: each row hashed (random odd 64-bit weights, wrapping sums), then
    checked against the first row of its hash; where a collision joined unequal rows, the exact
    lexsort decides (np.unique(axis=0) sorts rows as bytes: tens of times slower)."""
    weights = np.random.default_rng(0).integers(1, 2**62, size=rows.shape[1], dtype=np.int64) * 2 + 1
    hashes = (rows.astype(np.int64) * weights).sum(axis=1)  # integer overflow wraps: fine for a hash
    _, first, ids = np.unique(hashes, return_index=True, return_inverse=True)
    if (rows == rows[first[ids.reshape(-1)]]).all():
        return ids.reshape(-1)
    order = np.lexsort(rows.T[::-1])
    sorted_rows = rows[order]
    starts = np.concatenate([[True], (sorted_rows[1:] != sorted_rows[:-1]).any(axis=1)])
    ids = np.empty(len(rows), dtype=np.int64)
    ids[order] = np.cumsum(starts) - 1
    return ids
