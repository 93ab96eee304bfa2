"""Tool calling (OpenAI's `tools` and `tool_choice`) through structured outputs, as vLLM does it for
a named function and for "required": the model's completion is constrained to the call's JSON, so
any model emits well-formed calls to the functions offered, with arguments valid under their schemas.

- a named function: the completion is the arguments object (the function's `parameters` schema);
  the response carries one call to it, finish_reason "stop" (as OpenAI answers a forced function)
- "required": the completion is a JSON array of one or more {"name": ..., "parameters": {...}} (one
  only without parallel_tool_calls), each name one of the tools' with its own schema; finish_reason
  "tool_calls"
- "none", or no tools: plain text, and the tools are left out of the prompt
- "auto" (the default when tools are given: the model decides whether to call): the completion is
  free, and the parser of the model family's own call format (`serve --tool-call-parser`,
  server/tool_parsers.py) cuts calls out of it; without one, "auto" is refused (as vLLM does)

The tools go to the chat template (`tools=`), which renders them the way the model was trained to
read them where it knows how.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from cometserve.sampling_params import StructuredOutputsParams
from cometserve.server.protocol import APIError, ChatRequest, NamedToolChoice
from cometserve.server.tool_parsers import ToolParser

NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class ToolPlan:
    """How a request's completion becomes tool calls: constrained to a named function's arguments
    (`name`) or to a list of calls ("required"), or free text a parser reads calls from ("auto")."""

    structured: StructuredOutputsParams | None
    name: str | None = None
    parser: ToolParser | None = None

    def finish_reason(self, reason: str | None) -> str | None:
        """OpenAI's finish_reason for a completion with calls that ended with `reason`: "tool_calls"
        where the model chose to call ("required", "auto"), "stop" for a forced function, a cut
        completion's own reason."""
        return "tool_calls" if reason == "stop" and self.name is None else reason

    def split(self, text: str, reason: str | None) -> tuple[str | None, list[dict] | None]:
        """(content, calls in OpenAI's shape) of a completion. A named function's arguments are the
        text as it is (cut by max_tokens, they are cut, as OpenAI's are); "required" calls only from
        a whole array; "auto" calls as its parser finds them. No calls: (text, None)."""
        if self.name is not None:
            return None, [call_dict(0, self.name, text)]
        if self.parser is not None:
            content, pairs = self.parser.parse(text)
        else:
            try:
                value = json.loads(text) if reason == "stop" else None
            except ValueError:
                value = None
            content, pairs = None, [(c["name"], json.dumps(c["parameters"], ensure_ascii=False)) for c in value or []]
        if not pairs:
            return text, None
        return content or None, [call_dict(i, name, args) for i, (name, args) in enumerate(pairs)]


def call_dict(index: int, name: str, arguments: str, call_id: str | None = None) -> dict:
    return {"index": index, "id": call_id or f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


def template_tools(req: ChatRequest) -> list[dict] | None:
    """The tools the chat template renders: none where tool_choice is "none"."""
    if not req.tools or req.tool_choice == "none":
        return None
    return [t.model_dump(exclude_none=True) for t in req.tools]


def tool_plan(req: ChatRequest, structured: StructuredOutputsParams | None,
              parser: ToolParser | None = None) -> ToolPlan | None:
    """The request's tool plan (None: a plain completion), or APIError(400) naming what is wrong.
    `parser`: the server's for tool_choice "auto" (none: "auto" is refused)."""
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none"):
            raise APIError(400, "'tool_choice' needs 'tools'", "tool_choice")
        return None
    tools = {t.function.name: t.function for t in req.tools}
    if len(tools) != len(req.tools):
        raise APIError(400, "two tools have the same function name", "tools")
    if choice == "none":
        return None
    if choice in (None, "auto"):
        if parser is None:
            raise APIError(400, "tool_choice 'auto' (the model decides whether to call a tool; the default when "
                           "tools are given) needs the server started with --tool-call-parser (the model's own "
                           "call format). Send tool_choice 'required', 'none' or a named function", "tool_choice")
        return ToolPlan(structured, parser=parser)
    if structured is not None:
        raise APIError(400, "a tool call's shape is the tools' schemas: give either a tool_choice or a "
                       "response_format / structured output, not both", "tool_choice")
    if isinstance(choice, NamedToolChoice):
        fn = tools.get(choice.function.name)
        if fn is None:
            raise APIError(400, f"tool_choice names '{choice.function.name}', which is not among the tools",
                           "tool_choice")
        return ToolPlan(_structured({"json": fn.parameters or NO_ARGUMENTS}, fn.name), fn.name)
    calls = [{"type": "object", "properties": {"name": {"const": name}, "parameters": fn.parameters or NO_ARGUMENTS},
              "required": ["name", "parameters"], "additionalProperties": False} for name, fn in tools.items()]
    array = {"type": "array", "items": {"anyOf": calls}, "minItems": 1,
             **({} if req.parallel_tool_calls else {"maxItems": 1}), **_shared_defs(tools)}
    return ToolPlan(_structured({"json": array}, None))


def _shared_defs(tools: dict) -> dict:
    """The tools' own `$defs` / `definitions`, lifted to the root of the "required" array schema,
    where their "#/$defs/..." references resolve (pydantic writes nested models that way)."""
    out: dict[str, dict] = {}
    for fn in tools.values():
        for key in ("$defs", "definitions"):
            for name, schema in (fn.parameters or {}).get(key, {}).items():
                if out.setdefault(key, {}).setdefault(name, schema) != schema:
                    raise APIError(400, f"'tools': two functions define '{key}/{name}' differently: rename one", "tools")
    return out


def _structured(spec: dict, name: str | None) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(**spec)
    except ValueError as e:
        where = f"function '{name}' parameters" if name else "the tools' parameters"
        raise APIError(400, f"'tools': {where}: {e}", "tools") from None
