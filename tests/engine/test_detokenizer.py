"""Incremental detokenization against one full decode, with the SmolLM2 tokenizer the package ships
(byte-level BPE: multi-byte characters span several tokens)."""

from __future__ import annotations

import random
import time

import pytest

from cometserve.engine.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello, world! It's a  test:  spaces , punctuation . and\nnew lines\n\n  indented.",
    "Emoji 👋🏽 and flags 🇫🇷, CJK 日本語のテキスト, accents déjà vu, math ∑∫√ ≠ ∞.",
    "def f(x):\n    return {'a': [1, 2, 3]}  # code\n\tTabs\ttoo",
]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from cometserve import assets

    return AutoTokenizer.from_pretrained(str(assets.smollm2_dir()))


def _feed(tok, ids: list[int], sizes) -> tuple[str, IncrementalDetokenizer]:
    d, out, n = IncrementalDetokenizer(tok), [], 0
    for size in sizes:
        n = min(len(ids), n + size)
        out.append(d.update(ids[:n], final=n == len(ids)))
        if n == len(ids):
            break
    return "".join(out), d


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunks", ["one", "random"])
def test_deltas_concatenate_to_the_full_decode(tokenizer, text, chunks):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = ids[:7] + [tokenizer.eos_token_id] + ids[7:]  # a special token in the middle is skipped
    rng = random.Random(len(text))
    sizes = [1] * len(ids) if chunks == "one" else [rng.randint(1, 4) for _ in ids]
    got, d = _feed(tokenizer, ids, sizes)
    want = tokenizer.decode(ids, skip_special_tokens=True)
    assert got == want and d.text == want


def test_incomplete_character_is_held_until_complete_or_final(tokenizer):
    ids = tokenizer("👋🏽", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1  # the emoji's bytes span tokens
    d = IncrementalDetokenizer(tokenizer)
    assert d.update(ids[:1]) == ""  # half a character: nothing yet
    assert d.update(ids[:1], final=True) == "\ufffd"  # the stream ended inside it


def test_window_stays_short(tokenizer):
    """The cost per step must not grow with the output: the decoded window stays a few tokens."""
    ids = tokenizer(" ".join(TEXTS) * 8, add_special_tokens=False)["input_ids"]
    d = IncrementalDetokenizer(tokenizer)
    widest = 0
    t0 = time.perf_counter()
    for n in range(1, len(ids) + 1):
        d.update(ids[:n], final=n == len(ids))
        widest = max(widest, n - d.prefix_offset)
    incremental = time.perf_counter() - t0
    assert d.text == tokenizer.decode(ids, skip_special_tokens=True)
    assert len(ids) > 400 and widest <= 8, widest
    t0 = time.perf_counter()
    for n in range(1, len(ids) + 1):
        tokenizer.decode(ids[:n], skip_special_tokens=True)
    print(f"{len(ids)} tokens one at a time: incremental {incremental * 1e3:.1f} ms, "
          f"full re-decode {(time.perf_counter() - t0) * 1e3:.1f} ms")
