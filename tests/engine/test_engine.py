"""The batched engine against the one-sequence reference path (engine/llm.py `generate_reference`)
on a tiny random Llama, in 16-bit KV and FMPQ W4AxKV4; sampling parameters; abort and streaming.

INT4 KV semantics: attention reads the cache after each step's write, so with INT4 KV the result
depends on how a prompt is chunked (a group completed inside a chunk is read quantized by every
query of that chunk). Exact equality with the reference therefore needs what the reference does:
each prompt prefilled in one chunk (a large token budget) and one token per decode step. Chunked
prefill and preemption are compared exactly in 16-bit KV, where chunking changes nothing."""

from __future__ import annotations

import itertools
import re

import pytest
import torch

from cometserve.engine.engine import EngineConfig, LLMEngine
from cometserve.engine.llm import generate_reference
from cometserve.model.loader import load_model
from cometserve.sampling_params import SamplingParams
from tests.tiny_models import SMALL_8B, shrunk_config, write_tiny_model

LENGTHS = (5, 17, 64, 70, 130, 1)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def tiny16(tiny_dir):
    return load_model(tiny_dir, device="cpu")


@pytest.fixture(scope="module")
def tiny_w4axkv4(tiny_dir, tmp_path_factory):
    from cometserve.quant.quantize import quantize

    tokens = torch.randint(0, 320, (2, 64), generator=torch.Generator().manual_seed(1))
    out = quantize(tiny_dir, tmp_path_factory.mktemp("q") / "w4axkv4", scheme="fmpq_w4axkv4",
                   calib_tokens=tokens, device="cpu")
    return load_model(out, device="cpu")


def prompts(lengths=LENGTHS, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 320, (n,), generator=g).tolist() for n in lengths]


class CharTokenizer:
    """Token t -> one letter: enough to exercise stop strings and text deltas."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(97 + t % 26) for t in ids)


_SCHEDULING = {"async_scheduling": False}


@pytest.fixture(autouse=True, params=[False, True], ids=["sync", "async"])
def scheduling(request, monkeypatch):
    """Every engine test runs with synchronous and with async scheduling (the next step launched
    before the last one's samples are read): the outputs must be the same."""
    monkeypatch.setitem(_SCHEDULING, "async_scheduling", request.param)
    return request.param


def make_engine(loaded, tokenizer=None, **kw) -> LLMEngine:
    cfg = EngineConfig(**{"num_pages": 64, "use_cuda_graphs": False, "max_num_seqs": 16, **_SCHEDULING, **kw})
    return LLMEngine(loaded.model, loaded.scheme, cfg, tokenizer=tokenizer)


def run(engine: LLMEngine, batch: list[list[int]], params, check: bool = True) -> dict:
    """Add every prompt, step to the end; {index: (tokens, logprobs, text, finish_reason)}."""
    for i, ids in enumerate(batch):
        engine.add_request(str(i), ids, params if isinstance(params, SamplingParams) else params[i])
    acc: dict[str, list] = {str(i): [[], [], "", None] for i in range(len(batch))}
    engine.preemptions = 0
    while engine.has_unfinished():
        for d in engine.step():
            a = acc[d.request_id]
            assert a[3] is None, "delta after the final one"
            a[0] += d.new_token_ids
            a[1] += d.logprobs or []
            a[2] += d.text_delta
            a[3] = d.finish_reason
        if check:
            engine.scheduler.check_invariants()
    assert engine.scheduler.kv.num_free_blocks == engine.scheduler.kv.num_blocks, "blocks leaked"
    assert len(engine.storage.slots) == 0, "sequence slots leaked"
    assert not engine.runner.generators and not engine.runner.counts, "sampler state leaked"
    return {int(k): tuple(v) for k, v in acc.items()}


def reference(loaded, batch, params, tokenizer=None) -> dict:
    out = {}
    for i, ids in enumerate(batch):
        p = params if isinstance(params, SamplingParams) else params[i]
        c = generate_reference(loaded.model, loaded.scheme, ids, p, tokenizer)
        out[i] = (c.token_ids, c.logprobs, c.text, c.finish_reason)
    return out


def count_preemptions(engine: LLMEngine) -> list[str]:
    seen: list[str] = []
    schedule = engine.scheduler.schedule

    def wrapped():
        out = schedule()
        seen.extend(out.preempted_ids)
        return out

    engine.scheduler.schedule = wrapped
    return seen


GREEDY = SamplingParams(max_tokens=16, ignore_eos=True)


def test_greedy_equals_reference_16bit(tiny16):
    batch = prompts()
    got = run(make_engine(tiny16, page_size=16), batch, GREEDY)
    want = reference(tiny16, batch, GREEDY)
    assert {i: g[0] for i, g in got.items()} == {i: w[0] for i, w in want.items()}
    assert all(g[3] == "length" for g in got.values())


def test_greedy_equals_reference_w4axkv4(tiny_w4axkv4):
    assert tiny_w4axkv4.scheme.kv_bits == 4
    batch = prompts((5, 63, 64, 70, 1))  # groups of 64 filled in prefill and during decode
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    got = run(make_engine(tiny_w4axkv4), batch, params)
    want = reference(tiny_w4axkv4, batch, params)
    assert {i: g[0] for i, g in got.items()} == {i: w[0] for i, w in want.items()}


def run_preempted_like_reference(loaded, batch, params) -> dict:
    """Run `batch` on a cache sized to force preemption (and chunked prefill); the tokens must equal
    the one-sequence reference's. Returns run()'s outputs."""
    engine = make_engine(loaded, page_size=16, num_pages=14, max_num_batched_tokens=24)
    preempted = count_preemptions(engine)
    got = run(engine, batch, params)
    assert preempted, "the cache is sized to force preemption"
    want = reference(loaded, batch, params)
    assert {i: g[0] for i, g in got.items()} == {i: w[0] for i, w in want.items()}
    return got


def test_chunked_prefill_and_preemption_16bit(tiny16):
    run_preempted_like_reference(tiny16, prompts(), GREEDY)


@pytest.mark.parametrize("kv", ["16bit", "w4axkv4"])
def test_prefix_cache_hits_give_the_reference_tokens(kv, tiny16, tiny_w4axkv4):
    """Prompts sharing 1-2 leading pages (64 tokens: one INT4 group each) with an earlier request
    start from its cached K/V, and generate exactly what the one-sequence reference does (one chunk
    per prompt: the INT4 exactness condition above)."""
    loaded = tiny16 if kv == "16bit" else tiny_w4axkv4
    base, tail = prompts((150, 10), seed=3)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    engine = make_engine(loaded)
    run(engine, [base[:130]], params)  # caches its pages 0 and 1
    batch = [base[:64] + tail, base[:140], base[:128], base, tail]
    got = run(engine, batch, params)
    assert engine.scheduler.prefix_hit_tokens == 64 + 128 + 64 + 128  # base[:128]: its last page recomputed
    want = reference(loaded, batch, params)
    assert {i: g[0] for i, g in got.items()} == {i: w[0] for i, w in want.items()}


def test_async_scheduling_launches_ahead(tiny16, scheduling):
    """With async scheduling, decode steps are scheduled while the previous step is in flight (its
    samples held), and a request that stops on a token costs one dropped step, nothing else."""
    engine = make_engine(tiny16, page_size=16)
    assert engine.async_scheduling is scheduling
    ahead, schedule = [], engine.scheduler.schedule

    def recording_schedule():
        ahead.append(engine.scheduler.in_flight)
        return schedule()

    engine.scheduler.schedule = recording_schedule
    batch = prompts((9, 30, 3))
    greedy = reference(tiny16, batch, GREEDY)
    params = [GREEDY, SamplingParams(max_tokens=16, ignore_eos=True, stop_token_ids=(greedy[1][0][5],)), GREEDY]
    got = run(engine, batch, params)
    assert got[1][0] == greedy[1][0][:5] and got[1][3] == "stop"
    assert got[0][0] == greedy[0][0] and got[2][0] == greedy[2][0]
    assert sum(ahead) == (len(ahead) - 1 if scheduling else 0)  # all but the first step, when async


def test_chunked_int4_completes_and_frees(tiny_w4axkv4):
    batch = prompts((70, 130, 9))
    engine = make_engine(tiny_w4axkv4, num_pages=5, max_num_batched_tokens=48)
    got = run(engine, batch, SamplingParams(max_tokens=6, ignore_eos=True))
    assert all(len(g[0]) == 6 and g[3] == "length" for g in got.values())


def test_warm_up_chunks_a_long_prompt_and_leaves_the_engine_empty(tiny_w4axkv4):
    engine = make_engine(tiny_w4axkv4, max_num_batched_tokens=48)
    steps, schedule = [], engine.scheduler.schedule

    def recording_schedule():
        steps.append(schedule())
        return steps[-1]

    engine.scheduler.schedule = recording_schedule
    engine.warm_up()
    assert not engine.has_unfinished() and engine.scheduler.kv.num_free_blocks == 64
    chunked = [c for out in steps for c in out.chunks if c.start_pos > 0 and c.num_tokens > 1]
    assert chunked, "no prefill continued over a cached prefix"
    assert engine.step() == []


def test_seeded_sampling_reproducible_and_equal_to_reference(tiny16):
    batch = prompts((9, 30, 3))
    params = [SamplingParams(max_tokens=10, temperature=0.9, top_k=40, top_p=0.9, seed=s, ignore_eos=True,
                             logprobs=True) for s in (1, 2, 1)]
    first = run(make_engine(tiny16, page_size=16), batch, params)
    again = run(make_engine(tiny16, page_size=16, max_num_batched_tokens=8), batch, params)
    want = reference(tiny16, batch, params)
    assert {i: g[0] for i, g in first.items()} == {i: g[0] for i, g in again.items()}
    assert {i: g[0] for i, g in first.items()} == {i: w[0] for i, w in want.items()}
    for i in want:
        torch.testing.assert_close(torch.tensor(first[i][1]), torch.tensor(want[i][1]), rtol=1e-4, atol=1e-4)


def test_top_logprobs_equal_reference(tiny16):
    """top_logprobs: the k most likely tokens of each step's distribution, best first, as the reference
    computes them; beside requests that ask for none or another k (one batched top-k per step)."""
    batch = prompts((9, 30, 3, 17))
    params = [SamplingParams(max_tokens=6, ignore_eos=True, logprobs=True, top_logprobs=5),
              SamplingParams(max_tokens=6, temperature=0.8, seed=3, ignore_eos=True, logprobs=True, top_logprobs=2),
              SamplingParams(max_tokens=6, ignore_eos=True, logprobs=True),
              SamplingParams(max_tokens=6, ignore_eos=True)]
    engine = make_engine(tiny16, page_size=16)
    for i, ids in enumerate(batch):
        engine.add_request(str(i), ids, params[i])
    tops: dict[str, list] = {str(i): [] for i in range(len(batch))}
    while engine.has_unfinished():
        for d in engine.step():
            if d.top_logprobs is None:
                assert not params[int(d.request_id)].top_logprobs
            else:
                tops[d.request_id] += d.top_logprobs
    for i in (0, 1):
        want = generate_reference(tiny16.model, tiny16.scheme, batch[i], params[i])
        assert len(tops[str(i)]) == len(want.top_logprobs) == 6
        for got, ref in zip(tops[str(i)], want.top_logprobs):
            assert [t for t, _ in got] == [t for t, _ in ref]
            assert [v for _, v in got] == pytest.approx([v for _, v in ref], abs=1e-5)
            assert len(got) == params[i].top_logprobs and all(a[1] >= b[1] for a, b in itertools.pairwise(got))
        if params[i].greedy:  # the sampled token is the most likely one
            assert [t[0][0] for t in tops[str(i)]] == want.token_ids
    assert tops["2"] == tops["3"] == []


def test_logit_bias_equals_reference(tiny16):
    """logit_bias moves greedy and sampled picks (a banned greedy token is replaced, a +100 token is
    always picked), row by row beside plain greedy rows in the same step; the reported log-probability
    stays the unbiased one. Ids outside the vocabulary are refused at add_request."""
    batch = prompts((9, 30, 3))
    plain = reference(tiny16, batch[:1], GREEDY)[0][0]
    params = [SamplingParams(max_tokens=8, ignore_eos=True, logprobs=True, logit_bias={plain[0]: -100.0}),
              SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.9, seed=4, logprobs=True,
                             logit_bias={7: 100}),
              SamplingParams(max_tokens=8, ignore_eos=True, logprobs=True)]
    got = run(make_engine(tiny16, page_size=16), batch, params)
    want = reference(tiny16, batch, params)
    assert {i: g[0] for i, g in got.items()} == {i: w[0] for i, w in want.items()}
    for i in want:
        torch.testing.assert_close(torch.tensor(got[i][1]), torch.tensor(want[i][1]), rtol=1e-4, atol=1e-4)
    assert got[0][0][0] != plain[0] and got[1][0] == [7] * 8 and got[1][1][0] < -1.0  # unbiased: 7 is unlikely
    assert params[0].logit_bias == ((plain[0], -100.0),)
    with pytest.raises(ValueError, match="vocabulary"):
        make_engine(tiny16).add_request("x", batch[0], SamplingParams(logit_bias={10**6: 1.0}))
    for bad in ({5: 101.0}, {-1: 1.0}):
        with pytest.raises(ValueError, match="logit_bias"):
            SamplingParams(logit_bias=bad)


def test_penalties_equal_reference_through_preemption(tiny16):
    """presence/frequency penalties (counts of each request's generated tokens, kept on the device
    across steps, async launches and preemption by recompute) give the reference's tokens, greedy
    and seeded; a strong frequency penalty keeps greedy decoding from repeating a token."""
    batch = prompts()
    params = [SamplingParams(max_tokens=16, ignore_eos=True, logprobs=True, frequency_penalty=2.0)]
    params += [SamplingParams(max_tokens=16, ignore_eos=True, presence_penalty=1.5, temperature=0.8, seed=i)
               if i % 2 else SamplingParams(max_tokens=16, ignore_eos=True, frequency_penalty=-1.0)
               for i in range(1, len(batch))]
    got = run_preempted_like_reference(tiny16, batch, params)
    plain = reference(tiny16, batch[:1], GREEDY)[0][0]
    assert len(set(got[0][0])) == 16 and len(set(plain)) < 16  # the penalty is what changed it
    with pytest.raises(ValueError, match="frequency_penalty"):
        SamplingParams(frequency_penalty=2.5)


def test_min_p_equals_reference(tiny16):
    """min_p keeps tokens at least min_p times as likely as the best: 1.0 leaves only the argmax
    (sampling then equals greedy decoding); 0.2 samples as the reference does."""
    batch = prompts((9, 30))
    params = [SamplingParams(max_tokens=10, temperature=1.0, min_p=1.0, seed=2, ignore_eos=True),
              SamplingParams(max_tokens=10, temperature=1.0, min_p=0.2, seed=2, ignore_eos=True)]
    got = run(make_engine(tiny16, page_size=16), batch, params)
    want = reference(tiny16, batch, params)
    assert {i: g[0] for i, g in got.items()} == {i: w[0] for i, w in want.items()}
    assert got[0][0] == reference(tiny16, batch[:1], SamplingParams(max_tokens=10, ignore_eos=True))[0][0]
    with pytest.raises(ValueError, match="min_p"):
        SamplingParams(min_p=1.5)


@pytest.mark.parametrize("budget", [8192, 24])
def test_prompt_logprobs_equal_reference(tiny16, budget, scheduling):
    """prompt_logprobs: every prompt position's log-probability and top-k, as the reference's one
    prefill forward gives them, with the prompt whole or in chunks (a chunk's last row predicts the
    next chunk's first token), through a preemption (small budget, sync), and for a prompt whose
    pages are in the prefix cache (such a request computes its whole prompt). Only on the request's
    first delta."""
    batch = prompts((5, 17, 64, 70, 130, 1))
    batch.append(list(batch[4]))  # the same prompt again: its pages are cached by then
    params = [SamplingParams(max_tokens=4, ignore_eos=True, prompt_logprobs=k % 3) for k in range(len(batch))]
    engine = make_engine(tiny16, page_size=16, num_pages=14, max_num_batched_tokens=budget)
    preempted = count_preemptions(engine)
    for i, ids in enumerate(batch[:-1]):
        engine.add_request(str(i), ids, params[i])
    got: dict[str, list] = {}
    while engine.has_unfinished():
        for d in engine.step():
            if d.prompt_logprobs is not None:
                assert d.request_id not in got, "prompt logprobs sent twice"
                got[d.request_id] = d.prompt_logprobs
        if "4" in got and str(len(batch) - 1) not in engine._tracked and str(len(batch) - 1) not in got:
            engine.add_request(str(len(batch) - 1), batch[-1], params[-1])
    assert engine.scheduler.kv.num_free_blocks == engine.scheduler.kv.num_blocks
    assert not engine.runner.prompt_logprobs.pending, "pending rows leaked"
    assert preempted or budget == 8192 or scheduling, "the cache is sized to force a preemption"
    for i, ids in enumerate(batch):
        want = generate_reference(tiny16.model, tiny16.scheme, ids, params[i]).prompt_logprobs
        have = got[str(i)]
        assert len(have) == len(ids) and have[0] is None and want[0] is None
        for h, w in zip(have[1:], want[1:]):
            assert h[0] == pytest.approx(w[0], abs=1e-4)
            assert [t for t, _ in h[1]] == [t for t, _ in w[1]] and len(h[1]) == params[i].prompt_logprobs


@pytest.mark.parametrize("budget", [8192, 24])
def test_repetition_penalty_equals_reference(tiny16, budget):
    """repetition_penalty over prompt and generated tokens (the prompt marked chunk by chunk as it is
    prefilled, the whole of it: a prompt whose pages are cached is recomputed), greedy and seeded."""
    batch = prompts((5, 17, 64, 130, 1))
    batch.append(list(batch[3]))  # the same prompt again: its pages are cached by then
    params = [SamplingParams(max_tokens=12, ignore_eos=True, repetition_penalty=2.0, temperature=0.7 * (i % 2),
                             seed=i) for i in range(len(batch))]
    engine = make_engine(tiny16, page_size=16, num_pages=40, max_num_batched_tokens=budget)
    for i, ids in enumerate(batch[:-1]):
        engine.add_request(str(i), ids, params[i])
    got: dict[str, list[int]] = {str(i): [] for i in range(len(batch))}
    while engine.has_unfinished():
        for d in engine.step():
            got[d.request_id] += d.new_token_ids
            if d.request_id == "3" and d.finished:
                engine.add_request(str(len(batch) - 1), batch[-1], params[-1])
    assert not engine.runner.counts and not engine.runner.generators
    want = {str(i): generate_reference(tiny16.model, tiny16.scheme, ids, params[i]).token_ids
            for i, ids in enumerate(batch)}
    assert got == want
    plain = reference(tiny16, batch, SamplingParams(max_tokens=12, ignore_eos=True))
    assert any(got[str(i)] != plain[i][0] for i in range(0, len(batch), 2))  # greedy ones: the penalty acts
    with pytest.raises(ValueError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=0.0)


def test_stop_strings_tokens_and_max_tokens(tiny16):
    tok = CharTokenizer()
    batch = prompts((12, 40, 7))
    batch.append(batch[0])
    greedy = reference(tiny16, batch, GREEDY, tok)
    text0, ids1 = greedy[0][2], greedy[1][0]
    params = [
        SamplingParams(max_tokens=16, ignore_eos=True, stop=(text0[3:5], "zzzz")),  # stop string
        SamplingParams(max_tokens=16, ignore_eos=True, stop_token_ids=(ids1[4],)),  # stop token
        SamplingParams(max_tokens=3, ignore_eos=True, logprobs=True),  # length
        SamplingParams(max_tokens=16, ignore_eos=True, stop=(text0[3:5],), include_stop_str_in_output=True),
    ]
    got = run(make_engine(tiny16, tokenizer=tok, page_size=16), batch, params)
    want = reference(tiny16, batch, params, tok)
    for i in range(4):
        assert got[i][0] == want[i][0], i
        assert got[i][2] == want[i][2], i  # streamed text deltas add up to the reference text
        assert got[i][3] == want[i][3], i
    assert got[0][3] == "stop" and got[0][2] == text0[: text0.index(text0[3:5])]
    assert got[1][3] == "stop" and ids1[4] not in got[1][0][4:5]
    assert got[2][3] == "length" and len(got[2][0]) == 3 and len(got[2][1]) == 3
    assert got[3][3] == "stop" and got[3][2] == text0[: text0.index(text0[3:5]) + 2]  # the stop string kept


def test_min_tokens_equals_reference(tiny16):
    """min_tokens: a stop token cannot be sampled, and a stop string is not looked for, before that
    many tokens (vLLM's semantics); greedy rows with it are picked row by row beside plain ones."""
    tok = CharTokenizer()
    batch = prompts((12, 40, 7))
    greedy = reference(tiny16, batch, GREEDY, tok)
    ids0, text1 = greedy[0][0], greedy[1][2]
    params = [
        SamplingParams(max_tokens=16, ignore_eos=True, min_tokens=6, stop_token_ids=(ids0[1],)),
        SamplingParams(max_tokens=16, ignore_eos=True, min_tokens=8, stop=(text1[1:3],)),
        SamplingParams(max_tokens=16, ignore_eos=True, min_tokens=16),
    ]
    got = run(make_engine(tiny16, tokenizer=tok, page_size=16), batch, params)
    want = reference(tiny16, batch, params, tok)
    for i in range(3):
        assert got[i][0] == want[i][0] and got[i][2] == want[i][2] and got[i][3] == want[i][3], i
    assert len(got[0][0]) >= 6 and ids0[1] not in got[0][0][:6]  # without min_tokens: stops after 1 token
    assert len(got[1][0]) >= 8 and text1[1:3] in got[1][2][: len(tok.decode(got[1][0][:7]))]  # kept there
    assert got[2][0] == greedy[2][0]  # nothing to suppress: plain greedy
    for bad in (-1, 17):
        with pytest.raises(ValueError, match="min_tokens"):
            SamplingParams(max_tokens=16, min_tokens=bad)
    # through chunked prefill and preemption by recompute (the mask counts outputs, not computed tokens)
    batch = prompts()
    firsts = {i: g[0][1] for i, g in reference(tiny16, batch, GREEDY).items()}
    got = run_preempted_like_reference(tiny16, batch, [
        SamplingParams(max_tokens=16, ignore_eos=True, min_tokens=10, stop_token_ids=(firsts[i],))
        for i in range(len(batch))])
    assert all(len(g[0]) >= 10 for g in got.values())


def test_abort_frees_and_reports(tiny16):
    engine = make_engine(tiny16, page_size=16)
    for i, ids in enumerate(prompts((20, 8))):
        engine.add_request(f"r{i}", ids, SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.abort("r0") and not engine.abort("nope")
    reasons = {}
    for d in engine.stream():
        if d.finished:
            reasons[d.request_id] = d.finish_reason
    assert reasons == {"r0": "abort", "r1": "length"}
    assert engine.scheduler.kv.num_free_blocks == engine.scheduler.kv.num_blocks
    assert len(engine.storage.slots) == 0


def test_rejects_a_request_that_never_fits(tiny16):
    engine = make_engine(tiny16, page_size=16, num_pages=2)
    with pytest.raises(ValueError, match="KV blocks"):
        engine.add_request("big", list(range(40)), SamplingParams(max_tokens=4))


def cuda_random_model(tmp_path, mode: str):
    """A random 2-layer model of Llama-3-8B's head layout (vocabulary 4096) on CUDA."""
    from cometserve.engine.random_model import build_random_model

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    loaded = build_random_model(shrunk_config(tmp_path, **SMALL_8B), mode, device="cuda")
    with torch.no_grad():  # sharper logits than the throughput init: fewer near-ties
        loaded.model.lm_head.weight.mul_(3.0)
    return loaded


@pytest.mark.gpu
def test_cuda_min_tokens_beside_batched_greedy_in_decode_graphs(tmp_path):
    """On CUDA with decode graphs: a min_tokens row is picked from the graph's logits with its stop
    token masked, beside rows the graph's batched argmax picks, which keep their tokens."""
    loaded = cuda_random_model(tmp_path, "bf16")
    engine = LLMEngine(loaded.model, loaded.scheme, EngineConfig(max_num_seqs=8, num_pages=64, max_graph_batch=8))
    assert engine.runner.graphs is not None, engine.runner.graphs_error
    batch = [[t % 4096 for t in ids] for ids in prompts((5, 63, 64))]
    greedy = SamplingParams(max_tokens=12, ignore_eos=True)
    plain = run(engine, batch, greedy)
    stop = plain[0][0][1]
    got = run(engine, batch, [SamplingParams(max_tokens=12, ignore_eos=True, min_tokens=8, stop_token_ids=(stop,)),
                              greedy, greedy])
    assert got[1][0] == plain[1][0] and got[2][0] == plain[2][0]
    assert len(got[0][0]) >= 8 and stop not in got[0][0][:8]


@pytest.mark.gpu
def test_cuda_structured_rows_beside_batched_greedy_in_decode_graphs(tmp_path):
    """On CUDA with decode graphs and async scheduling (the default there): structured rows are sampled
    after the step in flight, under their grammar, beside rows the graph's batched argmax picks,
    which keep their tokens; the structured ones equal the synchronous engine's."""
    from cometserve.sampling_params import StructuredOutputsParams
    from tests.tiny_models import byte_tokenizer

    loaded = cuda_random_model(tmp_path, "bf16")
    tok = byte_tokenizer()

    def engine(async_scheduling: bool) -> LLMEngine:
        cfg = EngineConfig(max_num_seqs=8, num_pages=64, max_graph_batch=8, async_scheduling=async_scheduling)
        e = LLMEngine(loaded.model, loaded.scheme, cfg, tokenizer=tok)
        assert e.runner.graphs is not None, e.runner.graphs_error
        return e

    batch = [[t % 4096 for t in ids] for ids in prompts((5, 63, 64, 20))]
    greedy = SamplingParams(max_tokens=16, ignore_eos=True)
    plain = run(engine(True), batch, greedy)
    regex = StructuredOutputsParams(regex=r"[a-f]{3,6}-[0-9]{1,8}")
    params = [SamplingParams(max_tokens=16, structured_outputs=regex), greedy,
              SamplingParams(max_tokens=16, temperature=1.0, seed=3, structured_outputs=regex), greedy]
    got, sync = run(engine(True), batch, params), run(engine(False), batch, params)
    assert got[1][0] == plain[1][0] and got[3][0] == plain[3][0]
    assert [got[i][0] for i in range(4)] == [sync[i][0] for i in range(4)]
    for i in (0, 2):
        assert re.fullmatch(r"[a-f]{3,6}-[0-9]{1,8}", tok.decode(got[i][0])), tok.decode(got[i][0])


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["bf16", pytest.param("w4axkv4", marks=pytest.mark.xfail(
    reason="H100, 2026-11-24: 4/6 first tokens and 32/144 tokens agree with the reference path on this "
           "random 2-layer model. That is its noise floor: on CPU, the reference path itself with noise "
           "of 0.1% / 0.3% of mean |attention output| added keeps 5/6 / 3/6 first tokens and 28/144 "
           "tokens (INT4 activation codes flip and amplify; bf16 keeps 144/144), and the attention "
           "kernels differ from their reference by 0.6-4.8e-3 (scripts/noise_floor.py). Agreement cannot tell a bug here",
    strict=False))])
def test_cuda_engine_with_kernels_and_graphs_tracks_reference(mode, tmp_path):
    """On CUDA: Triton attention + decode CUDA graphs against the plain reference path (same
    model, same GEMMs; attention numerics differ in rounding only): most greedy tokens agree."""
    loaded = cuda_random_model(tmp_path, mode)
    batch = [[t % 4096 for t in ids] for ids in prompts((5, 63, 64, 200, 1, 130))]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    want = reference(loaded, batch, params)
    engine = None
    # whole prompts; chunked prefill (continuations read the pages); the batch again on that engine,
    # its prompts' leading pages now from the prefix cache
    for budget in (8192, 48, "again"):
        if budget != "again":
            engine = LLMEngine(loaded.model, loaded.scheme, EngineConfig(
                max_num_seqs=8, num_pages=64, max_graph_batch=8, max_num_batched_tokens=budget))
        assert engine.runner.graphs is not None, engine.runner.graphs_error
        assert engine.runner.attn.reason == "kernels"
        got = run(engine, batch, params)
        same = sum(a == b for i in want for a, b in zip(got[i][0], want[i][0]))
        first = sum(got[i][0][0] == want[i][0][0] for i in want)
        print(f"{mode} budget {budget}: {same}/{24 * len(batch)} tokens, {first}/{len(batch)} first tokens agree")
        assert first >= len(batch) - 1 and same >= 0.7 * 24 * len(batch)
    assert engine.scheduler.prefix_hit_tokens >= 64 * 4  # 200 and 130 tokens: 3 + 2 pages, less a page
