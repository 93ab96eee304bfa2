"""Piecewise CUDA graphs (engine/piecewise.py): the padded sizes on CPU; on CUDA, the graphed
forward against the eager one on the same step inputs (a prefill step, then a mixed prefill + decode
step) and generation through an engine with and without them. Also the decode graphs' short-context
variant (decode_graphs.DecodeGraphs) against the eager forward."""

from __future__ import annotations

import pytest
import torch

from cometserve.engine.engine import EngineConfig, LLMEngine
from cometserve.engine.interfaces import StepOutput
from cometserve.engine.piecewise import graph_sizes
from cometserve.sampling_params import SamplingParams
from tests.tiny_models import SMALL_8B, shrunk_config


def test_graph_sizes():
    assert graph_sizes(2048) == [16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048]
    assert graph_sizes(100) == [16, 32, 48, 64, 96, 100]
    assert graph_sizes(16) == [16] and graph_sizes(10) == [10]


def _small_random_model(mode: str, tmp_path):
    from cometserve.engine.random_model import build_random_model

    return build_random_model(shrunk_config(tmp_path, **SMALL_8B), mode, device="cuda")


def _step_both_ways(engine: LLMEngine) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Schedule one step, run its forward eagerly and through the pieces (the same K/V written
    twice to the same slots), then sample it through the runner and update the scheduler."""
    runner = engine.runner
    out = engine.scheduler.schedule()
    inputs = runner.prepare(out)
    with torch.inference_mode():
        eager = runner.forward(inputs.input_ids, inputs.positions, inputs.meta).clone()
        graphed = runner.pieces.run(inputs.input_ids, inputs.positions, inputs.meta).clone()
        logits, greedy = runner.logits(inputs)
    _sample_and_update(engine, out, inputs, logits, greedy)
    return eager, graphed, inputs.input_ids.shape[0]


def _sample_and_update(engine: LLMEngine, out, inputs, logits, greedy) -> None:
    """Sample a step's logits through the runner and hand the samples to the scheduler."""
    params = {c.request_id: c.sampling_params for c in out.chunks if c.needs_sample}
    engine.scheduler.update(StepOutput(engine.runner.sample(logits, greedy, inputs.sample_ids, params)))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["bf16", "w4axkv4"])
def test_pieces_match_eager_forward(mode, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    loaded = _small_random_model(mode, tmp_path)
    cfg = EngineConfig(max_num_seqs=8, num_pages=64, max_num_batched_tokens=512, async_scheduling=False)
    engine = LLMEngine(loaded.model, loaded.scheme, cfg)
    assert engine.runner.pieces is not None, engine.runner.pieces_error
    assert engine.runner.pieces.sizes[-1] == 512
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    for i, n in enumerate((5, 63, 130)):
        engine.add_request(f"a{i}", torch.randint(0, 4096, (n,), generator=g).tolist(), params)
    eager, graphed, t = _step_both_ways(engine)  # 198 prompt tokens: the 256-token graphs
    assert t == 198
    torch.testing.assert_close(graphed, eager, rtol=0, atol=0)
    engine.add_request("b", torch.randint(0, 4096, (40,), generator=g).tolist(), params)
    eager, graphed, t = _step_both_ways(engine)  # 3 decodes + a 40-token prompt: the 48-token graphs
    assert t == 43
    torch.testing.assert_close(graphed, eager, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["bf16", "w4axkv4"])
def test_engine_with_pieces_generates_like_eager(mode, tmp_path):
    """Also the CUDA paths of the sampling options: top_logprobs (decode-graph logits, pinned
    copies; the greedy token among the most likely: bf16 logits tie often and top-k's order among
    ties is arbitrary), logit_bias and penalties (per-row picks, counts on the device), seeded
    sampling: the same with and without the pieces."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    loaded = _small_random_model(mode, tmp_path)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 4096, (n,), generator=g).tolist() for n in (5, 63, 64, 200, 1, 130)]
    base = {"max_tokens": 16, "ignore_eos": True, "logprobs": True}
    params = [SamplingParams(**base, top_logprobs=4), SamplingParams(**base, top_logprobs=4),
              SamplingParams(**base, logit_bias={7: 100.0}), SamplingParams(**base, frequency_penalty=-2.0),
              SamplingParams(**base, presence_penalty=1.0, temperature=0.8, seed=3), SamplingParams(**base)]
    outs = []
    for pieces in (0, 2048):
        engine = LLMEngine(loaded.model, loaded.scheme, EngineConfig(
            max_num_seqs=8, num_pages=64, max_num_batched_tokens=96, max_piecewise_tokens=pieces))
        assert (engine.runner.pieces is not None) == bool(pieces), engine.runner.pieces_error
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, params[i])
        got: dict[str, list] = {str(i): [[], [], []] for i in range(len(prompts))}
        while engine.has_unfinished():
            for d in engine.step():
                got[d.request_id][0] += d.new_token_ids
                got[d.request_id][1] += d.logprobs
                got[d.request_id][2] += d.top_logprobs or []
        outs.append(got)
        del engine
    assert [v[0] for v in outs[0].values()] == [v[0] for v in outs[1].values()]
    assert [v[2] for v in outs[0].values()] == [v[2] for v in outs[1].values()]
    got = outs[1]
    assert got["2"][0] == [7] * 16 and len(set(got["3"][0])) <= 4  # forced; a negative penalty repeats
    for tokens, lps, tops in (got["0"], got["1"]):
        assert len(tops) == 16 and all(len(t) == 4 for t in tops)
        for token, lp, top in zip(tokens, lps, tops):
            assert lp == pytest.approx(top[0][1], abs=1e-5) and token in [t for t, v in top if v == top[0][1]]


@pytest.mark.gpu
def test_prompt_reading_options_on_cuda(tmp_path):
    """min_p, repetition_penalty and prompt_logprobs on CUDA (prompt rows through the LM head on the
    device, prompt tokens marked per prefill chunk, pinned copies), prompts chunked over several
    steps: the same tokens and prompt log-probabilities with and without the pieces; each prompt
    position's log-probability is at most the best alternative's."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    loaded = _small_random_model("w4axkv4", tmp_path)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 4096, (n,), generator=g).tolist() for n in (150, 7, 90)]
    base = {"max_tokens": 12, "ignore_eos": True}
    params = [SamplingParams(**base, prompt_logprobs=3), SamplingParams(**base, repetition_penalty=1.5),
              SamplingParams(**base, min_p=0.2, temperature=1.0, seed=5)]
    outs = []
    for pieces in (0, 2048):
        engine = LLMEngine(loaded.model, loaded.scheme, EngineConfig(
            max_num_seqs=8, num_pages=64, max_num_batched_tokens=96, max_piecewise_tokens=pieces))
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, params[i])
        got: dict[str, list] = {str(i): [[], None] for i in range(len(prompts))}
        while engine.has_unfinished():
            for d in engine.step():
                got[d.request_id][0] += d.new_token_ids
                got[d.request_id][1] = d.prompt_logprobs if d.prompt_logprobs is not None else got[d.request_id][1]
        outs.append(got)
        del engine
    assert outs[0] == outs[1]
    plps = outs[1]["0"][1]
    assert len(plps) == 150 and plps[0] is None
    for lp, alts in plps[1:]:
        assert len(alts) == 3 and lp <= alts[0][1] + 1e-5 and all(v <= 0 for _, v in alts)
    assert all(len(v[0]) == 12 for v in outs[1].values())


@pytest.mark.gpu
def test_warm_up_tunes_the_small_decode_buckets_without_graphs(tmp_path):
    """Without decode graphs (whose capture tunes their batch sizes) warm_up still tunes the GEMM's
    buckets of 1, 2 and 4 rows, so no served decode step stalls on tuning."""
    from cometserve.kernels import gemm_w4ax

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    loaded = _small_random_model("w4axkv4", tmp_path)
    engine = LLMEngine(loaded.model, loaded.scheme, EngineConfig(
        max_num_seqs=8, num_pages=64, max_num_batched_tokens=96, use_cuda_graphs=False))
    gemm_w4ax._STATE.tuned.clear()
    engine.warm_up()
    buckets = {key[1] for key in gemm_w4ax._STATE.tuned}
    assert {1, 2, 4} <= buckets, buckets


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["bf16", "w4axkv4"])
def test_short_context_decode_graph_matches_eager(mode, tmp_path):
    """Batch-1 decodes on either side of DecodeGraphs.SHORT_CONTEXT replay the graph captured for it
    or for max_model_len: the same logits, bit for bit, as the eager forward given that graph's
    max_context_len; within it, for W4AxKV4, the INT4 attention's split plan is the eager step's own
    (one split), so also the same logits as the plain eager forward."""
    import dataclasses

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    loaded = _small_random_model(mode, tmp_path)
    engine = LLMEngine(loaded.model, loaded.scheme, EngineConfig(
        max_num_seqs=4, num_pages=64, max_piecewise_tokens=0, async_scheduling=False))
    runner, graphs = engine.runner, engine.runner.graphs
    assert graphs is not None, engine.runner.graphs_error
    short, full = graphs.SHORT_CONTEXT, graphs.meta.max_context_len
    assert full > short and {(1, short), (1, full), (4, short), (4, full)} <= set(graphs.graphs)
    g = torch.Generator().manual_seed(0)
    engine.add_request("a", torch.randint(0, 4096, (short - 3,), generator=g).tolist(),
                       SamplingParams(max_tokens=8, ignore_eos=True))
    engine.step()  # the prompt
    seen = []
    for _ in range(6):  # contexts short - 2 .. short + 3 (a group fills at `short`)
        out = engine.scheduler.schedule()
        inputs = runner.prepare(out)
        key = graphs._key(1, inputs.meta.max_context_len)
        as_graph = dataclasses.replace(inputs.meta, max_context_len=key[1])
        with torch.inference_mode():
            eager = {m.max_context_len: runner.model.compute_logits(runner.forward(inputs.input_ids, inputs.positions, m))
                     for m in (inputs.meta, as_graph)}
            graphed, *greedy = graphs.run(inputs)  # (logits, greedy tokens, logprobs): runner.logits' split
        seen.append(key)
        torch.testing.assert_close(graphed, eager[key[1]], rtol=0, atol=0)
        if key[1] == short and mode == "w4axkv4":
            torch.testing.assert_close(graphed, eager[inputs.meta.max_context_len], rtol=0, atol=0)
        _sample_and_update(engine, out, inputs, graphed, tuple(greedy))
    assert seen == [(1, short)] * 3 + [(1, full)] * 3
