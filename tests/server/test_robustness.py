"""Hostile and malformed requests, clients that go away, overload, the API key, and shutdown."""

from __future__ import annotations

import json
import signal
import threading

import httpx2 as httpx
import openai
import pytest

from tests.server.conftest import MODEL, LiveServer, serve_process, wait_until

CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
LONG = "hello " * 1000  # ~1000 tokens: over the tiny model's 512-token context


def cmpl(**kw) -> dict:
    return {"model": MODEL, "prompt": "Hi there", "max_tokens": 4, **kw}


def chat(**kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **kw}


# (name, method, path, body: dict (sent as JSON) | bytes | None, expected status)
HOSTILE = [
    ("truncated json", "POST", CMPL, b'{"model": "tiny", "prompt": ', 400),
    ("empty body", "POST", CMPL, b"", 400),
    ("body is a list", "POST", CMPL, b"[1, 2, 3]", 400),
    ("body is a string", "POST", CMPL, b'"prompt"', 400),
    ("not utf-8", "POST", CMPL, b"\xff\xfe\x00garbage", 400),
    ("NaN temperature", "POST", CMPL, b'{"model": "%s", "prompt": "Hi", "temperature": NaN}' % MODEL.encode(), 400),
    ("deeply nested", "POST", CMPL, b'{"prompt": ' + b"[" * 100000 + b"]" * 100000 + b"}", 400),
    ("missing model", "POST", CMPL, {"prompt": "Hi"}, 400),
    ("missing prompt", "POST", CMPL, {"model": MODEL}, 400),
    ("unknown model", "POST", CMPL, cmpl(model="gpt-4"), 404),
    ("model not a string", "POST", CMPL, cmpl(model=7), 400),
    ("max_tokens string", "POST", CMPL, cmpl(max_tokens="5"), 400),
    ("max_tokens zero", "POST", CMPL, cmpl(max_tokens=0), 400),
    ("max_tokens negative", "POST", CMPL, cmpl(max_tokens=-3), 400),
    ("max_tokens float", "POST", CMPL, cmpl(max_tokens=1.5), 400),
    ("max_tokens past context", "POST", CMPL, cmpl(max_tokens=600), 400),
    ("max_tokens huge", "POST", CMPL, cmpl(max_tokens=10**30), 400),
    ("temperature too high", "POST", CMPL, cmpl(temperature=3.5), 400),
    ("temperature negative", "POST", CMPL, cmpl(temperature=-0.1), 400),
    ("temperature a word", "POST", CMPL, cmpl(temperature="hot"), 400),
    ("temperature bool", "POST", CMPL, cmpl(temperature=True), 400),
    ("top_p zero", "POST", CMPL, cmpl(top_p=0), 400),
    ("top_p above one", "POST", CMPL, cmpl(top_p=1.5), 400),
    ("n zero", "POST", CMPL, cmpl(n=0), 400),
    ("n too many", "POST", CMPL, cmpl(n=100000), 400),
    ("seed negative", "POST", CMPL, cmpl(seed=-1), 400),
    ("seed too big", "POST", CMPL, cmpl(seed=2**70), 400),
    ("five stop strings", "POST", CMPL, cmpl(stop=["a", "b", "c", "d", "e"]), 400),
    ("empty stop string", "POST", CMPL, cmpl(stop=[""]), 400),
    ("stop a number", "POST", CMPL, cmpl(stop=42), 400),
    ("empty prompt", "POST", CMPL, cmpl(prompt=""), 400),
    ("empty prompt list", "POST", CMPL, cmpl(prompt=[]), 400),
    ("empty token list", "POST", CMPL, cmpl(prompt=[[]]), 400),
    ("prompt object", "POST", CMPL, cmpl(prompt={"text": "Hi"}), 400),
    ("mixed prompt list", "POST", CMPL, cmpl(prompt=[1, "a"]), 400),
    ("token id past vocab", "POST", CMPL, cmpl(prompt=[5, 10**6]), 400),
    ("token id negative", "POST", CMPL, cmpl(prompt=[5, -1]), 400),
    ("prompt longer than context", "POST", CMPL, cmpl(prompt=LONG), 400),
    ("too many prompts", "POST", CMPL, cmpl(prompt=["a"] * 200), 400),
    ("unknown field (typo)", "POST", CMPL, cmpl(max_token=5), 400),
    ("logprobs past 20", "POST", CMPL, cmpl(logprobs=21), 400),
    ("stream not a bool", "POST", CMPL, cmpl(stream="yes"), 400),
    ("stream_options without stream", "POST", CMPL, cmpl(stream_options={"include_usage": True}), 400),
    ("presence penalty past 2", "POST", CMPL, cmpl(presence_penalty=3.0), 400),
    ("min_p past 1", "POST", CMPL, cmpl(min_p=1.5), 400),
    ("repetition_penalty zero", "POST", CMPL, cmpl(repetition_penalty=0), 400),
    ("min_tokens past max_tokens", "POST", CMPL, cmpl(max_tokens=4, min_tokens=5), 400),
    ("suffix", "POST", CMPL, cmpl(suffix="!"), 400),
    ("logit_bias key not a token id", "POST", CMPL, cmpl(logit_bias={"abc": 1}), 400),
    ("logit_bias token past vocab", "POST", CMPL, cmpl(logit_bias={"999999": 1}), 400),
    ("logit_bias value past 100", "POST", CMPL, cmpl(logit_bias={"5": 200}), 400),
    ("chat: no messages", "POST", CHAT, chat(messages=[]), 400),
    ("chat: messages missing", "POST", CHAT, {"model": MODEL}, 400),
    ("chat: messages a string", "POST", CHAT, chat(messages="Hi"), 400),
    ("chat: unknown role", "POST", CHAT, chat(messages=[{"role": "wizard", "content": "Hi"}]), 400),
    ("chat: content a number", "POST", CHAT, chat(messages=[{"role": "user", "content": 42}]), 400),
    ("chat: image part", "POST", CHAT,
     chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400),
    ("chat: message longer than context", "POST", CHAT, chat(messages=[{"role": "user", "content": LONG}]), 400),
    ("chat: top_logprobs without logprobs", "POST", CHAT, chat(top_logprobs=3), 400),
    ("chat: top_logprobs past 20", "POST", CHAT, chat(logprobs=True, top_logprobs=21), 400),
    ("chat: max_completion_tokens zero", "POST", CHAT, chat(max_completion_tokens=0), 400),
    ("chat: unknown model", "POST", CHAT, chat(model="llama"), 404),
    ("chat: response_format unknown type", "POST", CHAT, chat(response_format={"type": "xml"}), 400),
    ("chat: json_schema without schema", "POST", CHAT,
     chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), 400),
    ("chat: schema keyword unsupported", "POST", CHAT, chat(response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "number", "multipleOf": 3}}}), 400),
    ("chat: schema type misspelled", "POST", CHAT, chat(response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "str"}}}), 400),
    ("regex outside the dialect", "POST", CMPL, cmpl(structured_outputs={"regex": "(?<=a)b"}), 400),
    ("two structured outputs", "POST", CMPL, cmpl(guided_regex="a", guided_choice=["a"]), 400),
    ("regex with 2^20 automaton states", "POST", CMPL, cmpl(guided_regex="(a|b)*a(a|b){20}"), 400),
    ("structured_outputs empty", "POST", CMPL, cmpl(structured_outputs={}), 400),
    ("guided_choice empty", "POST", CMPL, cmpl(guided_choice=[]), 400),
    ("chat: tools with tool_choice auto", "POST", CHAT, chat(tools=[TOOL]), 400),
    ("chat: tool_choice without tools", "POST", CHAT, chat(tool_choice="required"), 400),
    ("chat: tool_choice names an unknown function", "POST", CHAT,
     chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "other"}}), 400),
    ("chat: tool name with spaces", "POST", CHAT,
     chat(tools=[{"type": "function", "function": {"name": "a b"}}], tool_choice="required"), 400),
    ("chat: tools twice the same name", "POST", CHAT, chat(tools=[TOOL, TOOL], tool_choice="required"), 400),
    ("chat: tool parameters unsupported", "POST", CHAT, chat(tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"x": {"not": {}}}}}}], tool_choice="required"), 400),
    ("chat: tools and response_format", "POST", CHAT,
     chat(tools=[TOOL], tool_choice="required", response_format={"type": "json_object"}), 400),
    ("chat: tool call arguments not JSON", "POST", CHAT, chat(messages=[
        {"role": "user", "content": "Hi"}, {"role": "assistant", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]), 400),
    ("allowed_token_ids past the vocabulary", "POST", CMPL, cmpl(allowed_token_ids=[5, 10**6]), 400),
    ("allowed_token_ids empty", "POST", CMPL, cmpl(allowed_token_ids=[]), 400),
    ("allowed_token_ids with a grammar", "POST", CMPL, cmpl(allowed_token_ids=[5], guided_regex="a"), 400),
    ("truncate_prompt_tokens zero", "POST", CMPL, cmpl(truncate_prompt_tokens=0), 400),
    ("chat: continue and add_generation_prompt", "POST", CHAT, chat(continue_final_message=True), 400),
    ("chat: chat_template_kwargs sets messages", "POST", CHAT, chat(chat_template_kwargs={"messages": []}), 400),
    ("GET on completions", "GET", CMPL, None, 405),
    ("unknown route", "POST", "/v1/embeddings", cmpl(), 404),
    ("unknown model card", "GET", "/v1/models/gpt-4", None, 404),
    ("body over 8 MiB", "POST", CMPL, b'{"prompt": "' + b"a" * (9 << 20) + b'"}', 413),
]


def test_hostile_requests_get_4xx_with_a_message(server):
    assert len(HOSTILE) >= 30
    failures = []
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for name, method, path, body, status in HOSTILE:
            kw = {"json": body} if isinstance(body, dict) else {"content": body}
            r = http.request(method, path, headers={"content-type": "application/json"}, **kw)
            try:
                err = r.json()["error"]
                ok = r.status_code == status and isinstance(err["message"], str) and err["message"]
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                failures.append((name, r.status_code, r.text[:200]))
    assert not failures, failures
    out = server.client().completions.create(model=MODEL, prompt="Still alive?", max_tokens=3, temperature=0)
    assert out.choices[0].finish_reason in ("length", "stop")
    assert httpx.get(f"{server.url}/health").status_code == 200
    server.assert_idle_and_free()


def test_client_errors_raise_in_the_openai_client(server):
    client = server.client()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="Hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": LONG}])


def _running_and_holding_blocks(engine) -> bool:
    kv = engine.engine.scheduler.kv
    return engine.engine.scheduler.num_running == 1 and kv.num_free_blocks < kv.num_blocks


def test_disconnect_mid_stream_aborts_and_frees(server):
    finished_before = server.engine.stats().num_finished.get("abort", 0)
    body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 480, "temperature": 0,
            "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}{CMPL}", json=body, timeout=60) as r:
        lines = r.iter_lines()
        received = [line for line, _ in zip(lines, range(6)) if line.startswith("data: ")]
        assert len(received) >= 3
        assert _running_and_holding_blocks(server.engine)
    # the connection is closed: the server aborts the request and frees its blocks
    server.assert_idle_and_free()
    assert server.engine.stats().num_finished.get("abort", 0) == finished_before + 1


def test_disconnect_while_waiting_for_a_whole_response(server):
    finished_before = server.engine.stats().num_finished.get("abort", 0)
    body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 480, "ignore_eos": True}

    def post():
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{server.url}{CMPL}", json=body, timeout=httpx.Timeout(60, read=0.3))

    t = threading.Thread(target=post)
    t.start()
    wait_until(lambda: _running_and_holding_blocks(server.engine), 10, "request running")
    t.join()
    server.assert_idle_and_free()
    assert server.engine.stats().num_finished.get("abort", 0) == finished_before + 1


def test_api_key_enforced(tiny_checkpoint):
    with LiveServer(tiny_checkpoint, api_key="s3cret", num_pages=8) as s:
        for key in ("none", "s3cret-not", "S3CRET"):
            with pytest.raises(openai.AuthenticationError):
                s.client(api_key=key).completions.create(model=MODEL, prompt="Hi", max_tokens=2)
        r = httpx.post(f"{s.url}{CMPL}", json=cmpl())
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.get(f"{s.url}/v1/models", headers={"Authorization": "Basic s3cret"})
        assert r.status_code == 401
        assert httpx.post(f"{s.url}/tokenize", json={"prompt": "Hi"}).status_code == 401
        assert httpx.post(f"{s.url}/detokenize", json={"tokens": [1]}).status_code == 401
        out = s.client(api_key="s3cret").completions.create(model=MODEL, prompt="Hi", max_tokens=2)
        assert out.usage.completion_tokens >= 1
        assert [m.id for m in s.client(api_key="s3cret").models.list().data] == [MODEL]
        assert httpx.get(f"{s.url}/health").status_code == 200  # probes need no key


def test_overload_answers_429_and_serves_the_rest(tiny_checkpoint):
    with LiveServer(tiny_checkpoint, max_queue=2, max_num_seqs=1, num_pages=8) as s:
        results: list = [None] * 8
        start = threading.Barrier(len(results))

        def one(i):
            client = s.client()
            start.wait()  # all at once: one runs, two wait, the rest find the queue full
            try:
                out = client.completions.create(model=MODEL, prompt=f"Request {i}", max_tokens=160,
                                                extra_body={"ignore_eos": True})
                results[i] = out.usage.completion_tokens
            except openai.RateLimitError as e:
                results[i] = e

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(results))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        refused = [r for r in results if isinstance(r, openai.RateLimitError)]
        assert refused and all("overloaded" in str(r) for r in refused), results
        assert all(r == 160 for r in results if not isinstance(r, Exception)), results
        assert len(refused) < len(results), "the first requests are served"
        assert s.engine.stats().num_rejected_overload == len(refused)
        s.assert_idle_and_free()
        assert s.client().completions.create(model=MODEL, prompt="after", max_tokens=2).choices
        with pytest.raises(openai.BadRequestError, match="never fit the waiting queue"):
            s.client().completions.create(model=MODEL, prompt="n=3 > queue", max_tokens=2, n=3)


def test_sigterm_drains_in_flight_requests_then_exits(tiny_checkpoint, tmp_path):
    """`cometserve serve` in its own process: SIGTERM lets a running stream finish, refuses new
    connections, and the process exits."""
    args = [str(tiny_checkpoint), "--device", "cpu", "--num-pages", "16", "--served-model-name", MODEL]
    with serve_process(args, tmp_path / "serve.log", timeout=60) as (proc, url):
        body = {"model": MODEL, "prompt": "Go on", "max_tokens": 300, "temperature": 0, "stream": True,
                "ignore_eos": True}
        events = []
        with httpx.stream("POST", f"{url}{CMPL}", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 2:
                        proc.send_signal(signal.SIGTERM)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length" and len(chunks) == 300
        proc.wait(timeout=30)
        assert proc.returncode in (0, -signal.SIGTERM), proc.returncode
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health")


def test_queue_bound_counts_each_waiting_request_once(tiny_checkpoint):
    """A request the engine thread has put in its scheduler must leave the 'being added' count at
    that moment, not when the event loop gets round to it: otherwise a burst is counted twice and
    answered 429 with a half-empty queue (seen on the GPU: 39 of 200 requests refused)."""
    from concurrent.futures import Future

    from cometserve.engine.async_engine import AsyncEngine
    from cometserve.engine.engine import EngineConfig
    from cometserve.sampling_params import SamplingParams

    cfg = EngineConfig(max_num_seqs=4, num_pages=16, use_cuda_graphs=False)
    engine = AsyncEngine.from_checkpoint(tiny_checkpoint, cfg, device="cpu", max_queue=4)
    engine._num_adding = 2  # as add() leaves it before handing the command to the engine thread
    done: Future = Future()
    engine._apply(("add", (["a", "b"], [[1, 2, 3], [4, 5]], [SamplingParams(max_tokens=2)] * 2, done)))
    assert done.done() and done.exception() is None
    assert engine._num_adding == 0 and engine.engine.scheduler.num_waiting == 2
