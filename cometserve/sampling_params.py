"""SamplingParams with OpenAI semantics (temperature 0 = greedy), validated on construction."""

from __future__ import annotations

import dataclasses
import json
import operator
from dataclasses import dataclass, field

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for a logit_bias value: [-100, 100]
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed's range, so a seed can never fail in the engine


@dataclass(frozen=True)
class StructuredOutputsParams:
    """vLLM's structured outputs: the completion is constrained to one of these (exactly one set).

    - `json`: a JSON schema (a dict or its JSON text): the completion is a JSON text valid under it
      (the subset structured/json_schema.py supports; other keywords are refused by name)
    - `regex`: the completion fully matches it (structured/regex.py's dialect)
    - `choice`: the completion is one of these strings
    - `json_object`: the completion is a JSON object (OpenAI's response_format json_object)
    """

    json: str | dict | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    json_object: bool = False

    def __post_init__(self) -> None:
        given = [n for n in ("json", "regex", "choice") if getattr(self, n) is not None] + (
            ["json_object"] if self.json_object else [])
        if len(given) != 1:
            raise ValueError(f"structured_outputs takes exactly one of json, regex, choice and json_object, "
                             f"got {given or 'none'}")
        if self.json is not None:  # kept as JSON text: hashable, and the key of the compiled grammar
            schema = self.json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except ValueError as e:
                    raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
            if not isinstance(schema, (dict, bool)):
                raise ValueError(f"structured_outputs.json must be a JSON schema object, got {type(schema).__name__}")
            object.__setattr__(self, "json", json.dumps(schema))
        if self.choice is not None:
            choice = (self.choice,) if isinstance(self.choice, str) else tuple(self.choice)
            if not choice or any(not isinstance(c, str) or not c for c in choice):
                raise ValueError("structured_outputs.choice must be a non-empty list of non-empty strings")
            object.__setattr__(self, "choice", choice)
        self.regex_pattern()  # a bad schema or pattern is refused here, with its reason

    def regex_pattern(self) -> str:
        """The regex whose full matches are the allowed completions."""
        from cometserve.structured import json_schema, regex

        if self.regex is not None:
            regex.parse(self.regex)
            return self.regex
        if self.choice is not None:
            return "|".join(f"(?:{json_schema.escape_literal(c)})" for c in self.choice)
        if self.json_object:
            return json_schema.json_object_regex()
        return json_schema.schema_to_regex(json.loads(self.json))


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1  # completions per prompt (LLM.generate / LLM.chat; the engine takes one per request)
    max_tokens: int = 64
    # vLLM's: EOS and stop_token_ids cannot be sampled, and stop strings are not looked for, before
    # this many tokens; 0 = off
    min_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one (after temperature); 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    include_stop_str_in_output: bool = False  # vLLM's: the completion ends after the stop string, not before
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: bool = False  # the sampled token's log-probability
    top_logprobs: int = 0  # and this many most likely tokens' (token id, log-probability), most likely first
    # the prompt tokens' log-probabilities (each given the tokens before it) with this many alternatives;
    # None = off. Such a request computes its whole prompt (no prefix-cache hits), as vLLM does.
    prompt_logprobs: int | None = None
    # added to these tokens' logits before any sampling, greedy too (OpenAI's logit_bias); a dict is
    # accepted and kept as ((token id, bias), ...) in token order
    logit_bias: tuple[tuple[int, float], ...] = field(default_factory=tuple)
    # OpenAI's penalties, on the tokens generated so far (as vLLM): logit - frequency * count - presence * (count > 0)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # vLLM's / HF's: the logits of tokens in the prompt or generated so far divided by it where positive,
    # multiplied where negative; 1 = off. Such a request computes its whole prompt (no prefix-cache hits).
    repetition_penalty: float = 1.0
    # vLLM's: the completion follows a JSON schema, a regex, a choice of strings or any JSON object
    structured_outputs: StructuredOutputsParams | None = None
    # vLLM's: only these token ids may be sampled (EOS only if listed); None = any
    allowed_token_ids: tuple[int, ...] | None = None
    skip_special_tokens: bool = True  # vLLM's: special tokens left out of the completion's text

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
        object.__setattr__(self, "logit_bias", tuple(sorted((t, float(b)) for t, b in bias)))
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be a positive integer, got {self.n!r}")
        if self.seed is not None:
            try:
                object.__setattr__(self, "seed", operator.index(self.seed))  # numpy integers too
            except TypeError:
                raise ValueError(f"seed must be None or an integer, got {self.seed!r}") from None
            if not 0 <= self.seed <= MAX_SEED:
                raise ValueError(f"seed must be None or an integer in [0, {MAX_SEED}], got {self.seed!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be a non-negative integer, got {self.top_k!r}")
        if not isinstance(self.top_logprobs, int) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs!r}")
        if self.prompt_logprobs is not None and (not isinstance(self.prompt_logprobs, int)
                                                 or not 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS):
            raise ValueError(f"prompt_logprobs must be None or an integer in [0, {MAX_TOP_LOGPROBS}], "
                             f"got {self.prompt_logprobs!r}")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=True")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise ValueError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty!r}")
        for t, b in self.logit_bias:
            if not isinstance(t, int) or t < 0:
                raise ValueError(f"logit_bias keys must be token ids (non-negative integers), got {t!r}")
            if not -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {b!r} for token {t}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")
        if self.allowed_token_ids is not None:
            ids = tuple(self.allowed_token_ids)
            if not ids or any(not isinstance(t, int) or t < 0 for t in ids):
                raise ValueError("allowed_token_ids must be a non-empty list of token ids (non-negative integers)")
            if self.structured_outputs is not None:
                raise ValueError("allowed_token_ids and structured_outputs: give one of them")
            object.__setattr__(self, "allowed_token_ids", ids)

    def choice(self, i: int) -> SamplingParams:
        """The parameters of completion number i of n: n = 1, and a given seed becomes seed + i, so
        that the n completions differ and each is reproducible."""
        seed = None if self.seed is None else (self.seed + i) % (MAX_SEED + 1)
        return dataclasses.replace(self, n=1, seed=seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def whole_prompt(self) -> bool:
        """The runner must see every prompt token (prompt log-probabilities, repetition penalty)."""
        return self.prompt_logprobs is not None or self.repetition_penalty != 1.0

    @property
    def batched_greedy(self) -> bool:
        """Picked by the runner's one argmax over the step's rows (no per-row logit changes)."""
        return (self.greedy and not self.logit_bias and not self.penalized and not self.min_tokens
                and self.structured_outputs is None and self.allowed_token_ids is None)


def find_stop(text: str, params: SamplingParams, checked: int = 0) -> int:
    """Where the completion text is cut at the first of params.stop that ends after position `checked`
    (text[:checked] was searched before, or precedes min_tokens): its start, or its end with
    include_stop_str_in_output; -1 if there is none."""
    hits = [(i, i + len(s)) for s in params.stop if (i := text.find(s, max(0, checked - len(s) + 1))) >= 0]
    if not hits:
        return -1
    start, end = min(hits)
    return end if params.include_stop_str_in_output else start
