"""tool_choice "auto": the parsers of the models' own call formats, and the chat stream that holds
back text that may start a call (responses.ChatFormat), against the whole response."""

from __future__ import annotations

import json
import random

import pytest

from cometserve.engine.engine import RequestDelta
from cometserve.server.responses import ChatFormat, Choice
from cometserve.server.tool_parsers import PARSERS
from cometserve.server.tools import ToolPlan

HERMES = PARSERS["hermes"]
LLAMA = PARSERS["llama3_json"]


@pytest.mark.parametrize("text, content, calls", [
    ("Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
     "Let me check.\n", [("get_weather", {"city": "Paris"})]),
    (('<tool_call>{"name": "a", "arguments": {}}</tool_call>\n<tool_call>{"name": "b", "arguments": "{\\"x\\": 1}"}'
     '</tool_call>'), "", [("a", {}), ("b", {"x": 1})]),
    ('<tool_call>{"name": "a", "arguments": {"q": "é"}}', "", [("a", {"q": "é"})]),  # EOS before the closing tag
    ("No tools needed: 2 + 2 = 4.", "No tools needed: 2 + 2 = 4.", []),
    ('Hm <tool_call>{"name": "a", "arguments": {oops}}</tool_call>', ('Hm <tool_call>{"name": "a", "arguments": {oops}}'
     '</tool_call>'), []),  # a broken call: all of it stays text
    ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),  # no name
])
def test_hermes(text, content, calls):
    got_content, got = HERMES.parse(text)
    assert got_content == content and [(n, json.loads(a)) for n, a in got] == calls


@pytest.mark.parametrize("text, calls", [
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', [("get_weather", {"city": "Paris"})]),
    (' {"name": "a", "parameters": {}}; {"name": "b", "arguments": {"k": [1]}} ', [("a", {}), ("b", {"k": [1]})]),
    ("The weather is fine.", []),
    ('{"name": "a", "parameters": {}} and then some', []),
    ('{"city": "Paris"}', []),
])
def test_llama3_json(text, calls):
    content, got = LLAMA.parse(text)
    assert [(n, json.loads(a)) for n, a in got] == calls
    assert content == ("" if calls else text)


def test_plain_upto_holds_back_what_may_start_a_call():
    assert HERMES.plain_upto("Sure, <tool") == len("Sure, ")
    assert HERMES.plain_upto("Sure, <tool_call>{") == len("Sure, ")
    assert HERMES.plain_upto("Sure, a < b") == len("Sure, a < b")
    assert LLAMA.plain_upto("  ") == 0 and LLAMA.plain_upto(' {"na') == 0 and LLAMA.plain_upto("The") == 3


def _stream(fmt: ChatFormat, text: str, reason: str, rng: random.Random) -> tuple[str, list, str]:
    """Feed `text` as deltas of random sizes; (content, tool calls, finish reason) the chunks carry."""
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, 12))) if len(text) > 1 else []
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    c, content, calls, final = Choice(), "", [], None
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        d = RequestDelta("r", [1], piece, finish_reason=reason if last else None)
        ch = fmt.chunk(0, c, d)["choices"][0]
        content += ch["delta"].get("content", "")
        calls += ch["delta"].get("tool_calls", [])
        final = ch["finish_reason"] or final
        c.text += piece
    return content, calls, final


@pytest.mark.parametrize("parser, text", [
    (HERMES, ('I will look. <tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call><tool_call>{"name": "g", '
     '"arguments": {}}</tool_call>')),
    (HERMES, "Just text, with a < sign and <tool but no call."),
    (LLAMA, '{"name": "f", "parameters": {"a": "x"}}; {"name": "g", "parameters": {}}'),
    (LLAMA, "Just text."),
])
def test_auto_stream_equals_the_whole_response(parser, text):
    plan = ToolPlan(None, parser=parser)
    whole = ChatFormat("m", None, False, tools=plan).choice(0, Choice(text=text, finish_reason="stop"))
    for seed in range(5):
        content, calls, reason = _stream(ChatFormat("m", None, False, tools=plan), text, "stop", random.Random(seed))
        msg = whole["message"]
        assert content == (msg["content"] or "") and reason == whole["finish_reason"]
        assert [(x["function"]["name"], x["function"]["arguments"]) for x in calls] == [
            (x["function"]["name"], x["function"]["arguments"]) for x in msg.get("tool_calls", [])]
    assert whole["finish_reason"] == ("tool_calls" if "name" in text else "stop")
