"""Tool calls in a model's own words, for tool_choice "auto" (`serve --tool-call-parser NAME`, vLLM's
names): the model writes text, calls, or both, in the format it was trained on, and the parser cuts
the calls out of the completion.

- `hermes` (Qwen2 / Qwen2.5, Hermes, and the many models trained on its format): calls are
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks after optional text
- `llama3_json` (Llama 3.1 / 3.2): the whole answer is one call or several joined by ";",
  `{"name": ..., "parameters": {...}}` (the <|python_tag|> before it is a special token: gone from the text)

A call that does not parse leaves the completion as plain text (nothing is invented). While
streaming, text that may still turn out to be the start of a call is held back (`plain_upto`).
"""

from __future__ import annotations

import json
import re


class ToolParser:
    name = ""

    def plain_upto(self, text: str) -> int:
        """How many leading characters of a completion so far are surely plain text."""
        raise NotImplementedError

    def parse(self, text: str) -> tuple[str, list[tuple[str, str]]]:
        """(plain text, calls as (name, arguments JSON text)); no calls: (text, [])."""
        raise NotImplementedError


def _arguments(call, key: str) -> tuple[str, str] | None:
    """A call object's (name, arguments as JSON text), or None if it is not one."""
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    args = call.get(key, {})
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    return (call["name"], json.dumps(args, ensure_ascii=False)) if isinstance(args, dict) else None


class HermesParser(ToolParser):
    name = "hermes"
    OPEN, CLOSE = "<tool_call>", "</tool_call>"
    _BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def plain_upto(self, text: str) -> int:
        i = text.find(self.OPEN)
        if i >= 0:
            return i
        for k in range(min(len(self.OPEN) - 1, len(text)), 0, -1):  # a tail that may begin the tag
            if text.endswith(self.OPEN[:k]):
                return len(text) - k
        return len(text)

    def parse(self, text: str) -> tuple[str, list[tuple[str, str]]]:
        start = text.find(self.OPEN)
        if start < 0:
            return text, []
        calls = []
        for body in self._BLOCK.findall(text, start):
            try:
                call = _arguments(json.loads(body), "arguments")
            except ValueError:
                call = None
            if call is None:
                return text, []
            calls.append(call)
        return text[:start], calls


class Llama3JsonParser(ToolParser):
    name = "llama3_json"

    def plain_upto(self, text: str) -> int:
        return 0 if not text.strip() or text.lstrip().startswith("{") else len(text)

    def parse(self, text: str) -> tuple[str, list[tuple[str, str]]]:
        body = text.strip()
        if not body.startswith("{"):
            return text, []
        decoder, calls, i = json.JSONDecoder(), [], 0
        while i < len(body):
            try:
                obj, i = decoder.raw_decode(body, i)
            except ValueError:
                return text, []
            call = _arguments(obj, "parameters" if isinstance(obj, dict) and "parameters" in obj else "arguments")
            if call is None:
                return text, []
            calls.append(call)
            rest = body[i:].lstrip()
            if rest and not rest.startswith(";"):
                return text, []
            i = len(body) - len(rest) + (1 if rest else 0)
            while i < len(body) and body[i].isspace():
                i += 1
        return "", calls


PARSERS = {p.name: p for p in (HermesParser(), Llama3JsonParser())}
