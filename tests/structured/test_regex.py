"""The regex -> byte DFA compiler against Python's `re` (ASCII meanings of \\d \\w \\s), and the
vocabulary walk against a token-by-token run of the DFA."""

import random
import re

import numpy as np
import pytest

from cometserve.structured.regex import RegexError, compile_regex, utf8_sequences
from cometserve.structured.vocab import TokenIndex

PATTERNS = [
    r"abc", r"(yes|no)", r"[0-9]{1,3}(\.[0-9]+)?", r"a*b+c?", r"[^a-c]x", r".{2,4}", r"(ab|a)(bc|c)",
    r"\d+-\w*\s?", r"é[à-ü]+", r"[\u4e00-\u9fff]{1,2}", r"(?:a|bc){2,}", r"x{3}y{0,2}", r"[\]\-a]+",
    r'"([^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*"', r"^(a|)b$", r"[^\n]+?", r"a{,2}", r"{a}{1}",
    r"x{y", r"a{1,x}",
]
ALPHABET = list("abcxy.-0129 \"\\éàü中{},]\n\t") + ["\u4e00", "\u9fff", "\U0001F600", "\x7f", "\u0800"]


def _texts(rng: random.Random, n: int):
    for _ in range(n):
        yield "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 7)))


@pytest.mark.parametrize("pattern", PATTERNS)
def test_dfa_accepts_what_python_re_fullmatches(pattern):
    dfa = compile_regex(pattern)
    rng = random.Random(pattern)
    oracle = re.compile(pattern, re.ASCII)
    texts = list(_texts(rng, 4000))
    # strings built from the pattern's own literals hit the accepting paths too
    literals = [c for c in pattern if c.isalnum() or c in " .\"-"] or ["a"]
    texts += ["".join(rng.choice(literals) for _ in range(rng.randint(0, 8))) for _ in range(4000)]
    for text in texts:
        assert dfa.matches(text) == bool(oracle.fullmatch(text)), (pattern, text)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_every_live_state_reaches_acceptance_and_is_minimal(pattern):
    dfa = compile_regex(pattern)
    trans = dfa.trans
    # no state but 0 is dead: each reaches an accepting state
    reach = dfa.accepting.copy()
    for _ in range(dfa.num_states):
        reach = reach | reach[trans].any(axis=1)
    assert reach[1:].all() and not reach[0] and (trans[0] == 0).all()
    # minimal: no two states have the same acceptance and the same row
    rows = {(bool(a), r.tobytes()) for a, r in zip(dfa.accepting, trans)}
    assert len(rows) == dfa.num_states


def test_utf8_sequences_cover_each_code_point_once():
    for lo, hi in [(0, 0x10FFFF), (0x7F, 0x800), (0xE000, 0x10000), (0x10FFF0, 0x10FFFF), (0x3B1, 0x3C9)]:
        seqs = utf8_sequences(lo, hi)
        rng = random.Random(lo)
        for cp in [lo, hi, *(rng.randint(lo, hi) for _ in range(300))]:
            if 0xD800 <= cp <= 0xDFFF:
                continue
            enc = chr(cp).encode()
            hits = [s for s in seqs if len(s) == len(enc) and all(a <= b <= c for (a, c), b in zip(s, enc))]
            assert len(hits) == 1, (hex(cp), hits)
        assert all(all(a <= b for a, b in s) for s in seqs)


@pytest.mark.parametrize("bad, where", [
    (r"(a", "missing )"), (r"a)", "unexpected ')'"), (r"*a", "nothing to repeat"), (r"(?=a)", "lookaround"),
    (r"a\1", "escape \\1"), (r"[z-a]", "ends before it starts"), (r"a^b", "anchor"), (r"a{3,1}", "maximum below"),
    (r"a{2000}", "above 1000"), (r"[^\x00-\U0010ffff]", "escape \\U"), (r"\x4", "hex digits"),
])
def test_patterns_outside_the_dialect_are_refused_with_the_reason(bad, where):
    with pytest.raises(RegexError, match=re.escape(where)):
        compile_regex(bad)


def test_empty_language_is_refused():
    with pytest.raises(RegexError, match="matches nothing"):
        compile_regex(r"x[^\s\S]")


def test_vocabulary_walk_equals_running_each_token():
    rng = random.Random(0)
    tokens = [None, b"", b'"', b'"a', b"ab", b'\\"', b"\xc3", b"\xa9x", b'"}', b"1", b"12.5", b" ", b'""']
    tokens += [bytes(rng.randint(0, 255) for _ in range(rng.randint(1, 6))) for _ in range(300)]
    index = TokenIndex(tokens)
    dfa = compile_regex(r'"([^"\\\x00-\x1f]|\\["\\/bfnrt])*"|-?[0-9]+(\.[0-9]+)?')
    for state in range(1, dfa.num_states):
        want = np.array([bool(t) and dfa.run(t, state) != 0 for t in tokens])
        assert (index.allowed(dfa.trans, state) == want).all(), state


def test_long_repeat_is_left_unminimized_and_still_exact():
    """(ab|cd){70,}: refinement would need more than MAX_REFINE_ROUNDS rounds; the automaton stays
    as the subset construction made it, every non-dead state still live, the language exact."""
    pattern = "(ab|cd){70,}e?"
    dfa = compile_regex(pattern)
    assert dfa.num_states > 140
    rng = random.Random(1)
    for _ in range(3000):
        k = rng.choice([69, 70, 71, 90])
        text = "".join(rng.choice(["ab", "cd"]) for _ in range(k)) + rng.choice(["", "e", "x", "a"])
        assert dfa.matches(text) == bool(re.fullmatch(pattern, text)), text
    reach = dfa.accepting.copy()
    for _ in range(dfa.num_states):
        reach = reach | reach[dfa.trans].any(axis=1)
    assert reach[1:].all()


@pytest.mark.parametrize("pattern, what", [(r"(a|b)*a(a|b){20}", "100000 automaton states"),
                                           (r"(a{1000}){1000}", "400000 automaton states")])
def test_patterns_that_explode_are_refused_not_computed(pattern, what):
    """A request cannot make the server build an automaton of millions of states: the subset
    construction (2^20 states here) and the NFA (a million copies) stop at their caps."""
    with pytest.raises(RegexError, match=what):
        compile_regex(pattern)
