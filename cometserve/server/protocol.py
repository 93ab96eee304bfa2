"""OpenAI request bodies: parsed strictly, checked, turned into token ids and SamplingParams.

Every way a body can be wrong ends in an `APIError` with a 4xx status and a message naming the
field, never in an exception from deeper down: the JSON is parsed here (NaN and Infinity refused),
types are checked strictly by pydantic (`"16"` is not an integer, `true` is not a number), unknown
fields are refused as OpenAI does (a typo like `max_token` is an error, not a silent default), and
values are checked against the model (context length, vocabulary) before the engine sees them.
Sampling ranges are SamplingParams' own checks (sampling_params.py), reported as 400.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cometserve.sampling_params import MAX_SEED, MAX_TOP_LOGPROBS, SamplingParams, StructuredOutputsParams

MAX_CHOICES = 128  # n times the number of prompts: one API request's sub-requests
MAX_STOP = 4  # OpenAI's limit on stop strings


class APIError(Exception):
    """An error answered to the client in OpenAI's shape: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class JSONSchemaFormat(_Strict):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    name: str
    json_schema: dict | None = Field(None, alias="schema")  # "schema" would shadow BaseModel.schema
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(_Strict):  # OpenAI's response_format
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputs(_Strict):  # vLLM's structured_outputs extension
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    json_schema: dict | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    json_object: bool = False


class _Common(_Strict):
    model: str
    max_tokens: int | None = None
    temperature: float = 1.0  # OpenAI's default: sampling, not greedy
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    top_k: int = 0  # extensions (vLLM's names): top-k and min-p sampling, repetition penalty, run
    min_p: float = 0.0  # to max_tokens past EOS, no stop before min_tokens
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    # the completion's shape: OpenAI's response_format, vLLM's structured_outputs, or vLLM's older
    # guided_json / guided_regex / guided_choice (one of them)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    allowed_token_ids: list[int] | None = None  # vLLM's extensions: only these tokens may be sampled,
    skip_special_tokens: bool = True  # special tokens in the text or not, keep the prompt's last N tokens
    truncate_prompt_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Strict):  # an assistant message's earlier call, sent back in the conversation
    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCall] | None = None


class FunctionDef(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_\-]{1,64}$")  # OpenAI's rule for function names
    description: str | None = None
    parameters: dict | None = None  # a JSON schema; none: the function takes no arguments
    strict: bool | None = None


class ToolDef(_Strict):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    # vLLM's chat template controls: continue the last (assistant) message instead of opening a new
    # one, and extra variables for the template (e.g. Qwen3's enable_thinking)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict | None = None


class TokenizeRequest(_Strict):  # vLLM's /tokenize: a prompt, or messages through the chat template
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Strict):  # vLLM's /detokenize
    model: str | None = None
    tokens: list[int]


_HINTS = {  # fields that take one of several shapes: say which, not why the first shape failed
    "prompt": "must be a string, a list of strings, a list of token ids, or a list of lists of token ids",
    "stop": "must be a string or a list of strings",
    "content": 'must be a string or a list of {"type": "text", "text": ...} parts',
}


def parse_body(raw: bytes, cls: type[_Strict]) -> _Strict:
    """Bytes -> a validated request model, or APIError(400)."""
    def no_constant(name: str):
        raise ValueError(f"{name} is not valid JSON")

    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=no_constant)
    except UnicodeDecodeError:
        raise APIError(400, "the request body is not UTF-8 text") from None
    except (ValueError, RecursionError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    body = {k: v for k, v in body.items() if v is not None}  # clients send null for "the default"
    try:
        return cls.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        # pydantic names the union member it tried ('str', 'list[int]'): not part of the field's path
        loc = [str(p) for p in err["loc"] if not (isinstance(p, str) and (p in _TYPE_TAGS or "[" in p))]
        where, param = ".".join(loc), loc[0] if loc else None
        if err["type"] == "extra_forbidden":
            raise APIError(400, f"unrecognized request argument: '{where}'", param) from None
        field = next((p for p in reversed(loc) if not p.isdigit()), None)
        if field in _HINTS and len(err["loc"]) > len(loc):
            raise APIError(400, f"'{where}' {_HINTS[field]}", param) from None
        raise APIError(400, f"invalid value for '{where}': {err['msg']}", param) from None


_TYPE_TAGS = {"str", "int", "float", "bool"}


def check_unsupported(req: _Common) -> None:
    """OpenAI parameters this server does not implement: refused by name instead of ignored."""
    refuse = [("suffix", req.suffix is not None, ""),
              ("best_of", req.best_of is not None and req.best_of != req.n, "other than n")
              ] if isinstance(req, CompletionRequest) else []
    for name, used, how in refuse:
        if used:
            raise APIError(400, f"'{name}'{' ' + how if how else ''} is not supported by this server", name)
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "'stream_options' is only allowed when 'stream' is true", "stream_options")
    if not 1 <= req.n <= MAX_CHOICES:
        raise APIError(400, f"'n' must be between 1 and {MAX_CHOICES}, got {req.n}", "n")
    if req.seed is not None and not 0 <= req.seed <= MAX_SEED:
        raise APIError(400, f"'seed' must be between 0 and {MAX_SEED}, got {req.seed}", "seed")
    stops = [req.stop] if isinstance(req.stop, str) else req.stop or []
    if len(stops) > MAX_STOP or any(not s for s in stops):
        raise APIError(400, f"'stop' takes at most {MAX_STOP} non-empty strings", "stop")
    top = ("logprobs", req.logprobs) if isinstance(req, CompletionRequest) else ("top_logprobs", req.top_logprobs)
    if top[1] is not None and not 0 <= top[1] <= MAX_TOP_LOGPROBS:
        raise APIError(400, f"'{top[0]}' must be between 0 and {MAX_TOP_LOGPROBS}, got {top[1]}", top[0])
    if isinstance(req, ChatRequest) and req.top_logprobs and not req.logprobs:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")


def check_prompt(ids: list[int], vocab_size: int, max_model_len: int, max_tokens: int | None,
                 param: str) -> None:
    if not ids:
        raise APIError(400, f"the prompt is empty ('{param}' gives no tokens)", param)
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is outside the vocabulary [0, {vocab_size})", param)
    if len(ids) >= max_model_len:
        raise APIError(400, f"the prompt has {len(ids)} tokens; this model's context is {max_model_len} "
                       f"tokens, prompt and completion together", param, "context_length_exceeded")
    if max_tokens is not None and len(ids) + max_tokens > max_model_len:
        raise APIError(400, f"the prompt's {len(ids)} tokens + max_tokens {max_tokens} exceed this model's "
                       f"context of {max_model_len} tokens", "max_tokens", "context_length_exceeded")


def check_token_ids(ids: list[int] | None, vocab_size: int, param: str) -> None:
    bad = next((t for t in ids or () if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise APIError(400, f"'{param}' names token id {bad}, outside the vocabulary [0, {vocab_size})", param)


def template_options(req: ChatRequest) -> dict:
    """apply_chat_template's keyword arguments beyond the messages and tools, checked."""
    if req.add_generation_prompt and req.continue_final_message:
        raise APIError(400, "'add_generation_prompt' and 'continue_final_message' cannot both be true: "
                       "set add_generation_prompt to false to continue the last message", "continue_final_message")
    extra = req.chat_template_kwargs or {}
    taken = sorted(set(extra) & _TEMPLATE_ARGS)
    if taken:
        raise APIError(400, f"'chat_template_kwargs' cannot set {taken}: they are request fields or the "
                       "template's own inputs", "chat_template_kwargs")
    return {**extra, "continue_final_message": req.continue_final_message}


_TEMPLATE_ARGS = {"messages", "conversation", "tools", "documents", "add_generation_prompt", "continue_final_message",
                  "tokenize", "return_dict", "chat_template"}


def logit_bias(req: _Common, vocab_size: int) -> dict[int, float]:
    """OpenAI's logit_bias ({"token id": bias}) with integer keys inside the vocabulary, or APIError."""
    out = {}
    for key, bias in (req.logit_bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise APIError(400, f"'logit_bias' keys must be token ids, got {key!r}", "logit_bias") from None
        if not 0 <= token < vocab_size:
            raise APIError(400, f"'logit_bias' token id {token} is outside the vocabulary [0, {vocab_size})",
                           "logit_bias")
        out[token] = bias
    return out


def structured_outputs(req: _Common) -> StructuredOutputsParams | None:
    """The request's constraint on its completion (response_format, structured_outputs or guided_*),
    checked (a bad schema or regex is a 400 that says why), or None."""
    given = []
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        given.append(("response_format", {"json_object": True}))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.json_schema is None:
            raise APIError(400, "'response_format' of type json_schema needs 'json_schema': {'name', 'schema'}",
                           "response_format")
        given.append(("response_format", {"json": fmt.json_schema.json_schema}))
    if req.structured_outputs is not None:
        so = req.structured_outputs
        given.append(("structured_outputs", {"json": so.json_schema, "regex": so.regex, "choice": so.choice,
                                             "json_object": so.json_object}))
    for name, key in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice")):
        if getattr(req, name) is not None:
            given.append((name, {key: getattr(req, name)}))
    if not given:
        return None
    if len(given) > 1:
        raise APIError(400, f"give at most one of {', '.join(n for n, _ in given)}", given[1][0])
    name, spec = given[0]
    try:
        return StructuredOutputsParams(**spec)
    except ValueError as e:
        raise APIError(400, f"'{name}': {e}", name) from None


def sampling_params(req: _Common, max_tokens: int, choice: int, logprobs: bool, top: int = 0,
                    bias: dict[int, float] | None = None, prompt_logprobs: int | None = None,
                    structured: StructuredOutputsParams | None = None, defaults: dict | None = None
                    ) -> SamplingParams:
    """The SamplingParams of choice number `choice`; seeded choices get seed + choice so that n > 1
    samples n different completions, reproducibly. `defaults`: the model's recommended values of
    temperature, top_p, top_k, min_p and repetition_penalty, for those the request leaves unset."""
    stop = [req.stop] if isinstance(req.stop, str) else req.stop or []
    defaults = defaults or {}
    knobs = {k: defaults[k] if k in defaults and k not in req.model_fields_set else getattr(req, k)
             for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")}
    try:
        return SamplingParams(
            max_tokens=max_tokens, min_tokens=req.min_tokens, **knobs, seed=req.seed, stop=tuple(stop),
            include_stop_str_in_output=req.include_stop_str_in_output,
            ignore_eos=req.ignore_eos, logprobs=logprobs, top_logprobs=top, logit_bias=bias or {},
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
            prompt_logprobs=prompt_logprobs,
            structured_outputs=structured, skip_special_tokens=req.skip_special_tokens,
            allowed_token_ids=None if req.allowed_token_ids is None else tuple(req.allowed_token_ids),
        ).choice(choice)
    except ValueError as e:  # SamplingParams' messages start with the field's name
        raise APIError(400, str(e), str(e).split(" ", 1)[0]) from None


def chat_messages(req: ChatRequest | TokenizeRequest) -> list[dict]:
    """Messages as the chat template expects them: content parts joined into one string; an
    assistant's tool calls with their arguments as objects (what templates render, as vLLM passes
    them), a tool result with the id of the call it answers."""
    out = []
    for m in req.messages:
        content = m.content if isinstance(m.content, str) or m.content is None else "".join(
            p.text for p in m.content)
        msg = {"role": m.role, "content": content or "", **({"name": m.name} if m.name else {})}
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            msg["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": _arguments(c.function.arguments)}} for c in m.tool_calls]
        out.append(msg)
    return out


def _arguments(text: str):
    try:
        return json.loads(text)
    except ValueError:
        raise APIError(400, f"a tool call's arguments are not valid JSON: {text[:80]!r}", "messages") from None
