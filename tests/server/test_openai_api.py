"""The official openai client against the live server: completions and chat, streamed and not, equal
to LLM.generate (greedy, same checkpoint); logprobs, usage, stop strings, n, seeds, /v1/models,
/metrics, the SSE wire format."""

from __future__ import annotations

import json
from typing import Literal

import httpx2 as httpx
import openai
import pytest
import torch

from cometserve.engine.engine import EngineConfig
from cometserve.engine.llm import LLM
from cometserve.sampling_params import SamplingParams
from tests.server.conftest import MAX_MODEL_LEN, MODEL

PROMPTS = ("The capital of France is", "Once upon a time, in a small village by the sea,")
CHAT = "What is the tallest mountain on Earth?"


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(tiny_checkpoint, device="cpu",
               engine_config=EngineConfig(max_num_seqs=8, num_pages=32, use_cuda_graphs=False))


def reference(llm, prompt: str, chat: bool = False, **kw):
    params = SamplingParams(**{"max_tokens": 12, "temperature": 0.0, "logprobs": True, **kw})
    return llm.generate(prompt, params, chat=chat, use_tqdm=False)[0]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_completion_greedy_equals_generate(server, llm, prompt):
    want = reference(llm, prompt)
    out = server.client().completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                             logprobs=0)
    c = out.choices[0]
    assert c.text == want.outputs[0].text
    assert c.finish_reason == want.outputs[0].finish_reason
    assert c.logprobs.token_logprobs == pytest.approx(want.outputs[0].logprobs, abs=1e-6)
    assert "".join(c.logprobs.tokens) == c.text or c.finish_reason == "stop"
    assert out.usage.prompt_tokens == len(want.prompt_token_ids)
    assert out.usage.completion_tokens == len(want.outputs[0].token_ids)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert out.model == MODEL and out.object == "text_completion" and out.id.startswith("cmpl-")


@pytest.mark.parametrize("prompt", PROMPTS)
def test_completion_stream_equals_generate(server, llm, prompt):
    want = reference(llm, prompt)
    chunks = list(server.client().completions.create(
        model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want.outputs[0].text
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [want.outputs[0].finish_reason]
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == len(want.outputs[0].token_ids)
    assert len({ch.id for ch in chunks}) == 1


def test_chat_greedy_equals_generate(server, llm):
    want = reference(llm, CHAT, chat=True)
    out = server.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": CHAT}],
                                                  max_tokens=12, temperature=0, logprobs=True)
    c = out.choices[0]
    assert c.message.role == "assistant" and c.message.content == want.outputs[0].text
    assert c.finish_reason == want.outputs[0].finish_reason
    assert [t.logprob for t in c.logprobs.content] == pytest.approx(want.outputs[0].logprobs, abs=1e-6)
    assert out.usage.prompt_tokens == len(want.prompt_token_ids)
    assert out.usage.completion_tokens == len(want.outputs[0].token_ids)
    assert out.object == "chat.completion"


def test_top_logprobs_equal_generate(server, llm):
    """Chat top_logprobs and completions logprobs=N: the N most likely tokens per position, best first,
    with the values LLM.generate gives (greedy: the sampled token is the first), streamed or not."""
    want = reference(llm, CHAT, chat=True, top_logprobs=3).outputs[0]
    client = server.client()
    msgs = [{"role": "user", "content": CHAT}]
    out = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0, logprobs=True,
                                         top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == len(want.token_ids)
    for item, top in zip(content, want.top_logprobs):
        assert [a.token for a in item.top_logprobs] == [llm.tokenizer.decode([t]) for t, _ in top]
        assert [a.logprob for a in item.top_logprobs] == pytest.approx([v for _, v in top], abs=1e-6)
        assert item.top_logprobs[0].token == item.token and item.top_logprobs[0].logprob == pytest.approx(item.logprob)
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0,
                                                 logprobs=True, top_logprobs=3, stream=True))
    streamed = [item for ch in chunks if ch.choices and ch.choices[0].logprobs for item in ch.choices[0].logprobs.content]
    assert [[a.logprob for a in item.top_logprobs] for item in streamed] == [
        [a.logprob for a in item.top_logprobs] for item in content]
    prompt = PROMPTS[0]
    want = reference(llm, prompt, top_logprobs=2).outputs[0]
    c = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, logprobs=2).choices[0]
    assert len(c.logprobs.top_logprobs) == len(want.token_ids)
    for alts, top in zip(c.logprobs.top_logprobs, want.top_logprobs):
        assert alts == pytest.approx({llm.tokenizer.decode([t]): v for t, v in reversed(top)}, abs=1e-6)


def test_logit_bias_forces_and_bans(server, llm):
    """logit_bias as OpenAI clients send it (string token ids): +100 makes a token every pick, -100 on
    the greedy completion's first token changes the first pick; both as LLM.generate gives them."""
    client = server.client()
    plain = reference(llm, PROMPTS[0]).outputs[0].token_ids
    forced = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=5, temperature=0.7, seed=1,
                                       logit_bias={"42": 100}, extra_body={"ignore_eos": True})
    assert forced.choices[0].text == llm.tokenizer.decode([42] * 5)
    banned = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                       logit_bias={str(plain[0]): -100})
    want = reference(llm, PROMPTS[0], logit_bias={plain[0]: -100.0}).outputs[0]
    assert banned.choices[0].text == want.text and want.token_ids[0] != plain[0]


def test_penalties_equal_generate(server, llm):
    """presence/frequency penalties (greedy and seeded) and the repetition penalty (vLLM's extension)
    as LLM.generate applies them; a negative frequency penalty makes greedy decoding repeat itself."""
    client = server.client()
    texts = []
    for kw, extra in (({"frequency_penalty": -2.0}, {}), ({"presence_penalty": 1.0, "temperature": 0.8, "seed": 5}, {}),
                      ({}, {"repetition_penalty": 1.7})):
        want = reference(llm, PROMPTS[1], max_tokens=16, ignore_eos=True, **kw, **extra).outputs[0]
        out = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=16,
                                        **{"temperature": 0, **kw}, extra_body={"ignore_eos": True, **extra})
        assert out.choices[0].text == want.text
        texts.append(want)
    plain = reference(llm, PROMPTS[1], max_tokens=16, ignore_eos=True).outputs[0]
    assert len(set(texts[0].token_ids)) < len(set(plain.token_ids))


def test_echo_returns_prompt_logprobs_like_generate(server, llm):
    """echo with logprobs (what lm-eval's loglikelihood requests send): the prompt's text and tokens
    before the completion's, the first prompt token without a log-probability, the others as
    LLM.generate's prompt_logprobs; the completion part as without echo."""
    client = server.client()
    prompt = PROMPTS[1]
    want = reference(llm, prompt, max_tokens=3, prompt_logprobs=2, top_logprobs=2).outputs[0]
    ids = llm.encode(prompt)
    c = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, echo=True,
                                  logprobs=2).choices[0]
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, logprobs=2).choices[0]
    assert c.text == prompt + plain.text
    lp = c.logprobs
    assert len(lp.tokens) == len(ids) + 3 and lp.tokens[len(ids):] == plain.logprobs.tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:len(ids)] == pytest.approx([e[0] for e in want.prompt_logprobs[1:]], abs=1e-5)
    for alts, e in zip(lp.top_logprobs[1:len(ids)], want.prompt_logprobs[1:]):
        assert alts == pytest.approx({llm.tokenizer.decode([t]): v for t, v in reversed(e[1])}, abs=1e-5)
    assert lp.token_logprobs[len(ids):] == pytest.approx(plain.logprobs.token_logprobs, abs=1e-6)
    ids_echo = client.completions.create(model=MODEL, prompt=ids, max_tokens=2, temperature=0, echo=True).choices[0]
    assert ids_echo.text.startswith(llm.tokenizer.decode(ids)) and ids_echo.logprobs is None
    # lm-eval's loglikelihood request (local-completions): token-id prompts in a batch, one sampled token
    batch = [llm.encode(p) for p in PROMPTS]
    out = client.completions.create(model=MODEL, prompt=batch, max_tokens=1, logprobs=1, temperature=0, seed=1234,
                                    echo=True)
    for choice, toks in zip(sorted(out.choices, key=lambda c: c.index), batch):
        ctx = 2  # score tokens [2, len) given the first two, as lm-eval slices [ctxlen:-1]
        scored = choice.logprobs.token_logprobs[ctx:-1]
        want = reference(llm, llm.tokenizer.decode(toks), max_tokens=1, prompt_logprobs=1).outputs[0]
        assert sum(scored) == pytest.approx(sum(e[0] for e in want.prompt_logprobs[ctx:]), abs=1e-4)
        greedy = [lp == max(top.values()) for lp, top in zip(scored, choice.logprobs.top_logprobs[ctx:-1])]
        assert greedy == [e[1][0][1] == e[0] for e in want.prompt_logprobs[ctx:]]


def test_echo_streamed_equals_echo_whole(server):
    """echo with stream: each choice's first chunk starts with its prompt (text, tokens, prompt
    log-probabilities); the chunks joined equal the whole response, text offsets included; n = 2."""
    client = server.client()
    kw = {"model": MODEL, "prompt": [PROMPTS[0], PROMPTS[1]], "max_tokens": 5, "temperature": 0, "echo": True,
          "logprobs": 2, "n": 2}
    whole = sorted(client.completions.create(**kw).choices, key=lambda c: c.index)
    chunks = list(client.completions.create(**kw, stream=True))
    assert len(whole) == 4
    for c in whole:
        mine = [ch.choices[0] for ch in chunks if ch.choices and ch.choices[0].index == c.index]
        assert mine[0].text.startswith(PROMPTS[c.index // 2]) and mine[0].logprobs.token_logprobs[0] is None
        assert "".join(ch.text for ch in mine) == c.text
        lps = [ch.logprobs for ch in mine if ch.logprobs is not None]
        assert [t for lp in lps for t in lp.tokens] == c.logprobs.tokens
        assert [o for lp in lps for o in lp.text_offset] == c.logprobs.text_offset
        assert [v for lp in lps for v in lp.token_logprobs] == pytest.approx(c.logprobs.token_logprobs, abs=1e-6)
        assert mine[-1].finish_reason == c.finish_reason


def test_chat_stream_equals_generate(server, llm):
    want = reference(llm, CHAT, chat=True)
    chunks = list(server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": CHAT}], max_tokens=12, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want.outputs[0].text
    assert chunks[-1].choices[0].finish_reason == want.outputs[0].finish_reason
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)


def test_chat_default_max_tokens_is_the_rest_of_the_context(server, llm):
    """No max_tokens in chat: the completion may run to the end of the context (OpenAI's default)."""
    ids = llm.encode(CHAT, chat=True)
    out = server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": CHAT}], temperature=0, extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == MAX_MODEL_LEN - len(ids)


def test_stop_string_cuts_like_generate(server, llm):
    full = reference(llm, PROMPTS[1], max_tokens=16, ignore_eos=True).outputs[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    want = reference(llm, PROMPTS[1], max_tokens=16, ignore_eos=True, stop=(stop,)).outputs[0]
    client = server.client()
    out = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=16, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "stop" == want.finish_reason
    assert out.choices[0].text == want.text == full[: full.index(stop)]
    streamed = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=16, temperature=0,
                                         stop=stop, stream=True, extra_body={"ignore_eos": True})
    assert "".join(ch.choices[0].text for ch in streamed) == want.text
    # min_tokens (vLLM's extension): the stop string is not looked for before the 16th token
    late = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=16, temperature=0, stop=[stop],
                                     extra_body={"ignore_eos": True, "min_tokens": 16})
    assert late.choices[0].text == full and late.choices[0].finish_reason == "length"
    kept = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=16, temperature=0, stop=[stop],
                                     extra_body={"ignore_eos": True, "include_stop_str_in_output": True})
    assert kept.choices[0].text == full[: full.index(stop) + len(stop)]


def test_n_choices_seeded_reproducible(server):
    client = server.client()

    def sample():
        out = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8, n=3, temperature=1.0,
                                        top_p=0.95, seed=1234, extra_body={"ignore_eos": True})
        assert [c.index for c in out.choices] == [0, 1, 2]
        assert out.usage.completion_tokens == 24
        return [c.text for c in out.choices]

    first = sample()
    assert sample() == first
    assert len(set(first)) > 1, "the n choices get different seeds"


def test_batch_of_prompts_and_token_ids(server, llm):
    client = server.client()
    out = client.completions.create(model=MODEL, prompt=list(PROMPTS), max_tokens=12, temperature=0, n=2)
    texts = [c.text for c in sorted(out.choices, key=lambda c: c.index)]
    assert texts[0] == texts[1] == reference(llm, PROMPTS[0]).outputs[0].text
    assert texts[2] == texts[3] == reference(llm, PROMPTS[1]).outputs[0].text
    ids = [llm.tokenizer(p)["input_ids"] for p in PROMPTS]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0)
    assert [c.text for c in by_ids.choices] == texts[::2]
    one = client.completions.create(model=MODEL, prompt=ids[1], max_tokens=12, temperature=0)
    assert one.choices[0].text == texts[2] and one.usage.prompt_tokens == len(ids[1])


def test_prefix_cache_hits_in_usage_and_metrics(server):
    """A prompt sent again reads its leading full pages (64 tokens) from the prefix cache: usage says
    how many prompt tokens, /metrics counts them, and the greedy text is the same."""
    client = server.client()
    ids = torch.randint(0, 49152, (200,), generator=torch.Generator().manual_seed(7)).tolist()

    def hits() -> float:
        text = httpx.get(f"{server.url}/metrics").text
        return float(text.split("\ncometserve_prefix_cache_hits_total ")[1].split()[0])

    before = hits()
    first = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0)
    again = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0, n=2)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens == 192  # 3 pages; the last one is recomputed
    assert again.usage.prompt_tokens == 200
    assert [c.text for c in again.choices] == [first.choices[0].text] * 2
    assert hits() - before == 2 * 192  # both choices of the second request hit


def test_models_health_and_metrics(server):
    client = server.client()
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("cometserve_num_requests_running", "cometserve_num_requests_waiting",
                 "cometserve_kv_cache_usage_ratio", "cometserve_generation_tokens_total",
                 'cometserve_time_to_first_token_seconds_bucket{le="+Inf"}',
                 "cometserve_inter_token_latency_seconds_count"):
        assert f"\n{name} " in text, name


def test_sse_wire_format(server):
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert len(chunks) == 4 and chunks[-1]["choices"][0]["finish_reason"] is not None


def test_null_fields_mean_the_default(server):
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 3, "temperature": None, "top_p": None,
            "n": None, "stop": None, "seed": None, "logprobs": None, "stream": None, "user": None}
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1 and r.json()["usage"]["completion_tokens"] >= 1


def test_tokenize_and_detokenize_like_the_generation_routes(server, llm):
    """vLLM's /tokenize and /detokenize: a prompt's ids as /v1/completions reads it, messages' as
    /v1/chat/completions reads them (its usage.prompt_tokens), and back to text; bad input is a 4xx."""
    with httpx.Client(base_url=server.url, timeout=60) as http:
        out = http.post("/tokenize", json={"model": MODEL, "prompt": PROMPTS[0]}).json()
        assert out["tokens"] == llm.encode(PROMPTS[0]) and out["count"] == len(out["tokens"])
        assert out["max_model_len"] == MAX_MODEL_LEN
        chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": CHAT}]}).json()
        used = server.client().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": CHAT}], max_tokens=1, temperature=0)
        assert chat["tokens"] == llm.encode(CHAT, chat=True) and chat["count"] == used.usage.prompt_tokens
        text = http.post("/detokenize", json={"model": MODEL, "tokens": out["tokens"]}).json()["prompt"]
        assert text == llm.tokenizer.decode(out["tokens"])
        for path, body, status in (("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "a"}]}, 400),
                                   ("/tokenize", {}, 400),
                                   ("/tokenize", {"model": "nope", "prompt": "a"}, 404),
                                   ("/detokenize", {"tokens": [1, 10**7]}, 400),
                                   ("/detokenize", {"tokens": "abc"}, 400)):
            r = http.post(path, json=body)
            assert r.status_code == status and r.json()["error"]["message"], (path, body, r.text)


def test_structured_outputs_follow_the_schema_and_equal_generate(server, llm):
    """response_format json_schema (through the openai client's parse() and a pydantic model),
    json_object, vLLM's structured_outputs and guided_choice: the random-weights model writes only
    what the grammar allows, token for token what LLM.generate writes."""
    import re

    import pydantic

    from cometserve.sampling_params import StructuredOutputsParams

    class Pet(pydantic.BaseModel):
        kind: Literal["cat", "dog"]
        good: bool

    client = server.client()
    messages = [{"role": "user", "content": CHAT}]
    parsed = client.chat.completions.parse(model=MODEL, messages=messages, response_format=Pet, max_tokens=120,
                                           temperature=0)
    c = parsed.choices[0]
    assert c.finish_reason == "stop" and isinstance(c.message.parsed, Pet)
    schema = openai.lib._pydantic.to_strict_json_schema(Pet)
    want = reference(llm, CHAT, chat=True, max_tokens=120, structured_outputs=StructuredOutputsParams(json=schema))
    assert c.message.content == want.outputs[0].text

    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=60, temperature=1.0, seed=1,
                                         response_format={"type": "json_object"})
    text = out.choices[0].message.content
    assert text.startswith("{") and (out.choices[0].finish_reason == "length" or isinstance(json.loads(text), dict))

    cmpl = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                     extra_body={"structured_outputs": {"regex": "[0-9]{2}-[a-z]{3}"}})
    assert re.fullmatch("[0-9]{2}-[a-z]{3}", cmpl.choices[0].text) and cmpl.choices[0].finish_reason == "stop"
    stream = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=12, temperature=0, stream=True,
                                       extra_body={"guided_choice": ["north", "south"]})
    assert "".join(ch.choices[0].text for ch in stream if ch.choices) in ("north", "south")
    server.assert_idle_and_free()


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                     "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}}, "required": ["zone"]}}}


def test_tool_calls_named_and_required(server):
    """tool_choice naming a function, and "required" (parallel or not): the random-weights model
    answers with well-formed calls to the offered functions, arguments valid under their schemas;
    streamed calls add up to the whole response's; the conversation continues with the call and its
    result."""
    client = server.client()
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    out = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER, TIME], tool_choice=named,
                                         max_tokens=80, temperature=0)
    c = out.choices[0]
    assert c.finish_reason == "stop" and c.message.content is None and len(c.message.tool_calls) == 1
    call = c.message.tool_calls[0]
    args = json.loads(call.function.arguments)
    assert call.function.name == "get_weather" and call.type == "function" and call.id.startswith("call_")
    assert set(args) == {"city", "unit"} and args["unit"] in ("celsius", "fahrenheit") and len(args["city"]) <= 12

    stream = list(client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER, TIME],
                                                 tool_choice=named, max_tokens=80, temperature=0, stream=True))
    deltas = [d for ch in stream if ch.choices for d in (ch.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == "get_weather" and deltas[0].id
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    assert [ch.choices[0].finish_reason for ch in stream if ch.choices][-1] == "stop"

    for parallel in (True, False):
        out = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER, TIME],
                                             tool_choice="required", parallel_tool_calls=parallel, max_tokens=200,
                                             temperature=1.0, seed=4)
        c = out.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.content is None
        assert 1 <= len(c.message.tool_calls) <= (99 if parallel else 1)
        for call in c.message.tool_calls:
            args = json.loads(call.function.arguments)
            assert call.function.name in ("get_weather", "get_time")
            assert set(args) == ({"city", "unit"} if call.function.name == "get_weather" else {"zone"})
    stream = list(client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER, TIME],
                                                 tool_choice="required", parallel_tool_calls=False, max_tokens=200,
                                                 temperature=1.0, seed=4, stream=True))
    whole = [d for ch in stream if ch.choices for d in (ch.choices[0].delta.tool_calls or [])]
    assert [(d.function.name, d.function.arguments) for d in whole] == [
        (t.function.name, t.function.arguments) for t in c.message.tool_calls]
    assert [ch.choices[0].finish_reason for ch in stream if ch.choices][-1] == "tool_calls"

    # pydantic's nested models: "$defs" inside a function's parameters, lifted for "required"
    city = {"type": "function", "function": {"name": "set_city", "parameters": {
        "$defs": {"City": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}},
                           "required": ["name"]}},
        "type": "object", "properties": {"city": {"$ref": "#/$defs/City"}}, "required": ["city"]}}}
    out = client.chat.completions.create(model=MODEL, messages=messages, tools=[city, TIME], tool_choice="required",
                                         parallel_tool_calls=False, max_tokens=120, temperature=0)
    (call2,) = out.choices[0].message.tool_calls
    assert call2.function.name in ("set_city", "get_time") and json.loads(call2.function.arguments)

    history = messages + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 C, clear"}]
    out = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], tool_choice="none",
                                         max_tokens=5, temperature=0)
    assert out.choices[0].message.tool_calls is None and out.choices[0].finish_reason in ("stop", "length")
    server.assert_idle_and_free()


def test_auto_tool_choice_with_a_parser_passes_plain_answers_through(tiny_checkpoint, llm):
    """serve --tool-call-parser hermes: tool_choice "auto" (the default with tools) leaves a completion
    without calls as content, token for token what LLM.generate writes, whole and streamed."""
    from tests.server.conftest import LiveServer

    want = reference(llm, CHAT, chat=True, max_tokens=10)
    with LiveServer(tiny_checkpoint, tool_call_parser="hermes") as s:
        client = s.client()
        kw = {"model": MODEL, "messages": [{"role": "user", "content": CHAT}], "tools": [WEATHER], "max_tokens": 10,
              "temperature": 0}
        out = client.chat.completions.create(**kw)
        streamed = "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(**kw, stream=True)
                           if ch.choices)
    assert "<tool_call>" not in want.outputs[0].text
    assert out.choices[0].message.content == want.outputs[0].text == streamed
    assert out.choices[0].message.tool_calls is None and out.choices[0].finish_reason == "length"


def test_vllm_request_extensions(server, llm):
    """truncate_prompt_tokens, allowed_token_ids + skip_special_tokens, and the chat template's
    continue_final_message / add_generation_prompt / chat_template_kwargs, as vLLM's server takes them."""
    client = server.client()
    long = "word " * 600  # past the 512-token context
    out = client.completions.create(model=MODEL, prompt=long, max_tokens=4, temperature=0,
                                    extra_body={"truncate_prompt_tokens": 100})
    assert out.usage.prompt_tokens == 100

    out = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=5, temperature=0,
                                    extra_body={"allowed_token_ids": [1], "skip_special_tokens": False,
                                                "ignore_eos": True})
    assert out.choices[0].text == "<|im_start|>" * 5

    tok = llm.tokenizer
    messages = [{"role": "user", "content": CHAT}, {"role": "assistant", "content": "The tallest mountain is"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False, continue_final_message=True)
    assert text.endswith("The tallest mountain is")
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, temperature=0, extra_body={
        "add_generation_prompt": False, "continue_final_message": True, "chat_template_kwargs": {"custom_flag": True}})
    assert out.usage.prompt_tokens == len(tok(text, add_special_tokens=False)["input_ids"])
    want = llm.generate({"prompt_token_ids": tok(text, add_special_tokens=False)["input_ids"]},
                        SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)[0].outputs[0]
    assert out.choices[0].message.content == want.text


def test_generation_config_defaults(tiny_checkpoint, llm, tmp_path):
    """serve's --generation-config auto (vLLM's default): the model's recommended sampling fills the
    fields a request leaves unset (or sends as null); `vllm` keeps OpenAI's defaults. Also
    --chat-template (the given template replaces the model's) and --allowed-origins (CORS)."""
    import shutil

    from tests.server.conftest import LiveServer

    path = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, path)
    (path / "generation_config.json").write_text(json.dumps({"temperature": 0.0, "eos_token_id": 2}))
    want = reference(llm, PROMPTS[0]).outputs[0].text  # greedy
    template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant]"
    with LiveServer(path, chat_template=template, allowed_origins=["https://app.example"]) as s:
        client = s.client()
        cors = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
        assert httpx.options(f"{s.url}/v1/chat/completions", headers=cors).headers.get(
            "access-control-allow-origin") == "https://app.example"  # serve --allowed-origins
        other = httpx.options(f"{s.url}/v1/chat/completions", headers={**cors, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        tokens = httpx.post(f"{s.url}/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
        assert llm.tokenizer.decode(tokens["tokens"]) == "[user] Hi\n[assistant]"  # serve --chat-template
        unset = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, seed=5)
        null = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, seed=5,
                                         extra_body={"temperature": None})
        hot = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, seed=5, temperature=1.0)
    assert unset.choices[0].text == null.choices[0].text == want != hot.choices[0].text
    from cometserve.engine.async_engine import AsyncEngine
    from cometserve.server.app import OpenAIRoutes

    engine = AsyncEngine.__new__(AsyncEngine)
    engine.sampling_defaults, engine.tokenizer = {"temperature": 0.0}, None
    assert OpenAIRoutes(engine, MODEL, None, generation_config="vllm").defaults == {}
    engine.sampling_defaults = {"temperature": 7.0}
    with pytest.raises(ValueError, match="generation_config.json has a default"):
        OpenAIRoutes(engine, MODEL, None)
