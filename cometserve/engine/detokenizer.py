"""Incremental detokenization: the text of a growing token list at a cost per step that does not
grow with its length.

Decoding every output token again at every step costs O(n) per step and O(n^2) per request: at
batch 256 and a few hundred tokens each, a fast tokenizer spends milliseconds per step on it,
as long as the GPU's whole decode step. Here each step decodes only a short window: the tokens of
the previous step (context) plus the new ones, and keeps what the new ones add. Decoding the window
with its context makes tokenizer artifacts at the window's start (a SentencePiece token's leading
space dropped at the start of a decode, cleanup of spaces before punctuation) the same in both
decodes, so they cancel; a window that ends inside a multi-byte character (U+FFFD) waits for the
next token.
"""

from __future__ import annotations

from cometserve.sampling_params import SamplingParams, find_stop

REPLACEMENT = "\ufffd"


def completion_text(tokenizer, token_ids: list[int], params: SamplingParams) -> tuple[str, bool]:
    """(the text of a completion's tokens cut at its first stop string, whether one was found). A
    stop string that ends before the text of token number min_tokens does not count: no one looks for
    it while fewer tokens exist."""
    skip = params.skip_special_tokens
    text = tokenizer.decode(token_ids, skip_special_tokens=skip)
    checked = 0
    if params.min_tokens > 1:
        checked = len(tokenizer.decode(token_ids[: params.min_tokens - 1], skip_special_tokens=skip))
    i = find_stop(text, params, checked)
    return (text[:i], True) if i >= 0 else (text, False)


class IncrementalDetokenizer:
    """`text` of `token_ids` so far; `update(token_ids)` extends it with the tokens added since the
    last call (the list only grows). Special tokens are skipped unless asked for, as in
    `tokenizer.decode(..., skip_special_tokens=...)`, whose result the concatenated text equals."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self.text = ""
        self.prefix_offset = 0  # tokens [prefix_offset, read_offset): the last window's new tokens,
        self.read_offset = 0    # decoded again as the context of the next window

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def update(self, token_ids: list[int], final: bool = False) -> str:
        """Append the text of token_ids[read_offset:]; return what was appended. `final`: the list
        is complete, so a trailing incomplete character is emitted as U+FFFD rather than held."""
        if len(token_ids) <= self.read_offset:
            return ""
        context = self._decode(token_ids[self.prefix_offset:self.read_offset])
        window = self._decode(token_ids[self.prefix_offset:])
        if len(window) <= len(context) or (window.endswith(REPLACEMENT) and not final):
            return ""  # only special tokens, or a character still incomplete: the window grows
        added = window[len(context):]
        self.text += added
        self.prefix_offset, self.read_offset = self.read_offset, len(token_ids)
        return added
