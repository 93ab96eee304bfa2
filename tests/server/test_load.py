"""64 concurrent streaming clients, several requests each, completions and chat mixed: every request
complete, no error, the metrics agree with what the clients received, and the KV cache is fully free
afterwards. The server's 48 KV pages hold fewer sequences than arrive, so requests queue (checked)
and may be preempted and resumed."""

from __future__ import annotations

import asyncio
import random
import re

import httpx2 as httpx
import openai
import pytest

from tests.server.conftest import MODEL, LiveServer

NUM_CLIENTS = 64
REQUESTS_PER_CLIENT = 3


def metric_values(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        m = re.fullmatch(r"(\S+) (\S+)", line)
        if m and not line.startswith("#"):
            out[m.group(1)] = float(m.group(2))
    return out


async def one_client(server: LiveServer, k: int) -> list[tuple[int, int, str]]:
    """REQUESTS_PER_CLIENT streamed requests in a row; [(asked, received tokens, finish_reason)]."""
    rng = random.Random(k)
    client = server.client(cls=openai.AsyncOpenAI)
    done = []
    async with client:
        for j in range(REQUESTS_PER_CLIENT):
            max_tokens = rng.randint(2, 12)
            common = {"model": MODEL, "max_tokens": max_tokens, "temperature": rng.choice([0.0, 0.8]),
                      "seed": k * 10 + j, "stream": True, "stream_options": {"include_usage": True},
                      "extra_body": {"ignore_eos": True}}
            text = f"client {k} request {j}: " + "word " * rng.randint(0, 60)
            if (k + j) % 2:
                stream = await client.chat.completions.create(messages=[{"role": "user", "content": text}], **common)
            else:
                stream = await client.completions.create(prompt=text, **common)
            reasons, usage, chunks = [], None, 0
            async for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
                for c in chunk.choices:
                    chunks += 1
                    if c.finish_reason:
                        reasons.append(c.finish_reason)
            assert len(reasons) == 1 and usage is not None, (k, j, reasons)
            done.append((max_tokens, usage.completion_tokens, reasons[0]))
    return done


@pytest.fixture(scope="module")
def busy_server(tiny_checkpoint):
    with LiveServer(tiny_checkpoint, max_num_seqs=64, num_pages=48, max_num_batched_tokens=1024) as s:
        yield s


def test_64_concurrent_streaming_clients(busy_server):
    before = metric_values(busy_server.url)

    peak = {"waiting": 0}

    async def watch(stop: asyncio.Event):
        while not stop.is_set():
            peak["waiting"] = max(peak["waiting"], busy_server.engine.stats().num_waiting)
            await asyncio.sleep(0.01)

    async def all_clients():
        stop = asyncio.Event()
        watcher = asyncio.create_task(watch(stop))
        out = await asyncio.gather(*(one_client(busy_server, k) for k in range(NUM_CLIENTS)))
        stop.set()
        await watcher
        return out

    results = [r for per_client in asyncio.run(all_clients()) for r in per_client]
    assert peak["waiting"] > 0, "the load is meant to queue requests"
    assert len(results) == NUM_CLIENTS * REQUESTS_PER_CLIENT
    assert all(asked == got and reason == "length" for asked, got, reason in results), results
    busy_server.assert_idle_and_free()
    after = metric_values(busy_server.url)
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    tokens = sum(got for _, got, _ in results)
    assert delta["cometserve_generation_tokens_total"] == tokens
    assert delta["cometserve_time_to_first_token_seconds_count"] == len(results)
    assert delta["cometserve_inter_token_latency_seconds_count"] == tokens - len(results)
    assert after["cometserve_kv_cache_usage_ratio"] == 0.0
    assert after["cometserve_num_requests_running"] == after["cometserve_num_requests_waiting"] == 0
