"""OpenAI response bodies for /v1/completions and /v1/chat/completions, whole and as stream chunks.

A `Choice` accumulates one sub-request's deltas. `CompletionFormat` and `ChatFormat` differ only in
where text and log-probabilities go, so the route code (app.py) is shared by both endpoints.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field


@dataclass
class Choice:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[tuple[tuple[int, float], ...]] = field(default_factory=list)
    prompt_logprobs: list | None = None  # echo: the engine's prompt_logprobs of its prompt
    finish_reason: str | None = None
    cached_tokens: int = 0  # of its prompt, from the prefix cache


def token_strings(tokenizer, ids: list[int]) -> list[str]:
    """Each token decoded alone (what logprobs show); `token_id:N` without a tokenizer."""
    if tokenizer is None:
        return [f"token_id:{t}" for t in ids]
    return [tokenizer.decode([t]) for t in ids]


def usage(num_prompt_tokens: int, choices: list[Choice], n: int) -> dict:
    """Token counts; a prompt (counted once for its n choices) reports its first choice's cache hits."""
    completion = sum(len(c.token_ids) for c in choices)
    return {"prompt_tokens": num_prompt_tokens, "completion_tokens": completion,
            "total_tokens": num_prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": sum(c.cached_tokens for c in choices[::n])}}


class CompletionFormat:
    """`logprobs`: the sampled tokens' log-probabilities are returned; `top`: with this many most
    likely alternatives per token; `echo`: per prompt (token ids, text), put before each of its
    choices (completions' echo; the prompt's first token has no log-probability: None)."""

    object, chunk_object, id_prefix = "text_completion", "text_completion", "cmpl"

    def __init__(self, model: str, tokenizer, logprobs: bool, n: int = 1, top: int = 0,
                 echo: list[tuple[list[int], str]] | None = None) -> None:
        self.model, self.tokenizer, self.want_logprobs, self.n, self.top = model, tokenizer, logprobs, n, top
        self.echo = echo
        self._echoed: set[int] = set()  # streamed choices whose prompt went out (in their first chunk)
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _alternatives(self, tops: list[tuple[tuple[int, float], ...]]) -> list[list[tuple[str, float]]]:
        """Each token's alternatives as (token string, logprob), most likely first (None stays None)."""
        return [None if top is None else list(zip(token_strings(self.tokenizer, [t for t, _ in top]),
                                                  [lp for _, lp in top])) for top in tops]

    def logprobs(self, ids: list[int], lps: list[float], tops: list, offset: int = 0) -> dict | None:
        if not self.want_logprobs:
            return None
        tokens = token_strings(self.tokenizer, ids)
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        top = [None if alts is None else dict(alts) for alts in self._alternatives(tops)] if self.top else None
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": top, "text_offset": offsets}

    def response(self, choices: list[Choice], num_prompt_tokens: int) -> dict:
        body = self._head(self.object)
        body["choices"] = [self.choice(i, c) for i, c in enumerate(choices)]
        body["usage"] = usage(num_prompt_tokens, choices, self.n)
        return body

    def _with_prompt(self, index: int, prompt_logprobs, text: str, ids: list[int], lps: list, tops: list):
        """Echo: the prompt's text, tokens and log-probabilities (None where there are none) first."""
        p_ids, p_text = self.echo[index // self.n]
        entries = prompt_logprobs or [None] * len(p_ids)
        return (p_text + text, p_ids + ids, [e and e[0] for e in entries] + lps,
                [e and e[1] for e in entries] + tops)

    def choice(self, index: int, c: Choice) -> dict:
        text, ids, lps, tops = c.text, c.token_ids, c.logprobs, c.top_logprobs
        if self.echo is not None:
            text, ids, lps, tops = self._with_prompt(index, c.prompt_logprobs, text, ids, lps, tops)
        return {"index": index, "text": text, "logprobs": self.logprobs(ids, lps, tops),
                "finish_reason": c.finish_reason}

    def chunk(self, index: int, c: Choice, delta) -> dict:
        """One engine delta of choice `index`; `c` is the choice so far, before this delta. With echo
        the choice's first chunk starts with its prompt (text offsets then count from the prompt)."""
        body = self._head(self.chunk_object)
        text, ids, finish_reason = delta.text_delta, delta.new_token_ids, delta.finish_reason
        lps, tops, offset = delta.logprobs or [], delta.top_logprobs or [], len(c.text)
        if self.echo is not None and index not in self._echoed:
            self._echoed.add(index)
            text, ids, lps, tops = self._with_prompt(index, delta.prompt_logprobs, text, ids, lps, tops)
        elif self.echo is not None:
            offset += len(self.echo[index // self.n][1])
        lp = self.logprobs(ids, lps, tops, offset) if ids else None
        body["choices"] = [{"index": index, "text": text, "logprobs": lp, "finish_reason": finish_reason}]
        return body

    def first_chunks(self, n: int) -> list[dict]:
        return []

    def usage_chunk(self, choices: list[Choice], num_prompt_tokens: int) -> dict:
        body = self._head(self.chunk_object)
        body["choices"] = []
        body["usage"] = usage(num_prompt_tokens, choices, self.n)
        return body


class ChatFormat(CompletionFormat):
    """`tools`: the request's tool plan (server/tools.py): its completions are tool calls."""

    object, chunk_object, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def __init__(self, model: str, tokenizer, logprobs: bool, n: int = 1, top: int = 0, tools=None) -> None:
        super().__init__(model, tokenizer, logprobs, n, top)
        self.tools = tools
        self._sent: dict[int, int] = {}  # tool plans, streamed: choice -> characters of its text sent

    def logprobs(self, ids: list[int], lps: list[float], tops: list, offset: int = 0) -> dict | None:
        if not self.want_logprobs:
            return None
        alts = self._alternatives(tops) if self.top else [[] for _ in ids]
        content = [{"token": t, "logprob": lp, "bytes": list(t.encode()),
                    "top_logprobs": [{"token": s, "logprob": v, "bytes": list(s.encode())} for s, v in alt]}
                   for t, lp, alt in zip(token_strings(self.tokenizer, ids), lps, alts)]
        return {"content": content}

    def choice(self, index: int, c: Choice) -> dict:
        message, reason = {"role": "assistant", "content": c.text}, c.finish_reason
        if self.tools is not None:
            content, calls = self.tools.split(c.text, reason)
            if calls is not None:
                message = {"role": "assistant", "content": content,
                           "tool_calls": [{k: v for k, v in call.items() if k != "index"} for call in calls]}
                reason = self.tools.finish_reason(reason)
        return {"index": index, "message": message,
                "logprobs": self.logprobs(c.token_ids, c.logprobs, c.top_logprobs), "finish_reason": reason}

    def _tool_delta(self, index: int, c: Choice, delta) -> dict:
        """A tool plan's stream: a named function's arguments as they come (its id and name with the
        first piece); otherwise the text that surely is plain as it comes ("auto"), and the calls
        whole in the last chunk, with any text held back before them."""
        text, reason = c.text + delta.text_delta, delta.finish_reason
        if self.tools.name is not None:
            if index not in self._sent:
                self._sent[index] = 0
                return {"tool_calls": self.tools.split(delta.text_delta, None)[1]}
            return {"tool_calls": [{"index": 0, "function": {"arguments": delta.text_delta}}]} if delta.text_delta else {}
        sent = self._sent.get(index, 0)
        if reason is None:
            upto = self.tools.parser.plain_upto(text) if self.tools.parser is not None else 0
            self._sent[index] = max(sent, upto)
            return {"content": text[sent:upto]} if upto > sent else {}
        content, calls = self.tools.split(text, reason)
        if calls is None:
            return {"content": text[sent:]}
        rest = (content or "")[sent:]  # plain_upto never passes a call's start: content holds what was sent
        return {**({"content": rest} if rest else {}), "tool_calls": calls}

    def chunk(self, index: int, c: Choice, delta) -> dict:
        body = self._head(self.chunk_object)
        text, ids, finish_reason = delta.text_delta, delta.new_token_ids, delta.finish_reason
        content = {"content": text} if text or finish_reason is None else {}
        if self.tools is not None:
            content = self._tool_delta(index, c, delta)
            if "tool_calls" in content:
                finish_reason = self.tools.finish_reason(finish_reason)
        lp = self.logprobs(ids, delta.logprobs or [], delta.top_logprobs or []) if ids else None
        body["choices"] = [{"index": index, "delta": content, "logprobs": lp, "finish_reason": finish_reason}]
        return body

    def first_chunks(self, n: int) -> list[dict]:
        """OpenAI opens every chat choice with a delta that carries the role."""
        out = []
        for i in range(n):
            body = self._head(self.chunk_object)
            body["choices"] = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None}]
            out.append(body)
        return out
