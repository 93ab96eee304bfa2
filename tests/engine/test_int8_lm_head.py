"""EngineConfig.lm_head = "int8" (model/layers/lm_head.py): the engine quantizes the LM head per row
at start, frees the 16-bit one (a tied head keeps the embedding), and then generates exactly what a
16-bit model whose head holds the dequantized INT8 weights (codes x scales) generates."""

from __future__ import annotations

import pytest
import torch

from cometserve.engine.engine import EngineConfig, LLMEngine
from cometserve.kernels import ref
from cometserve.model.loader import load_model
from cometserve.sampling_params import SamplingParams
from tests.tiny_models import write_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
PARAMS = SamplingParams(max_tokens=10, ignore_eos=True, logprobs=True)


def _run(loaded, **kw) -> dict[str, tuple[list[int], list[float]]]:
    engine = LLMEngine(loaded.model, loaded.scheme, EngineConfig(num_pages=32, use_cuda_graphs=False, **kw))
    g = torch.Generator().manual_seed(0)
    for i, n in enumerate((3, 40, 9)):
        engine.add_request(str(i), torch.randint(0, 320, (n,), generator=g).tolist(), PARAMS)
    out: dict[str, tuple[list[int], list[float]]] = {str(i): ([], []) for i in range(3)}
    for d in engine.stream():
        out[d.request_id][0].extend(d.new_token_ids)
        out[d.request_id][1].extend(d.logprobs)
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: tied embeddings
def test_int8_head_generates_as_its_dequantized_16bit_head(tmp_path, family):
    path = write_tiny_model(family, tmp_path / family)
    int8 = load_model(path, device="cpu", dtype=torch.float32)
    got = _run(int8, lm_head="int8")
    model = int8.model
    assert model.lm_head is None and model.int8_head.codes.dtype == torch.int8
    assert model.model.embed_tokens.weight.dtype == torch.float32  # the embedding stays

    plain = load_model(path, device="cpu", dtype=torch.float32)
    head = plain.model.lm_head if plain.model.lm_head is not None else plain.model.model.embed_tokens
    codes, scales = ref.quantize_rows_int8(head.weight)
    assert torch.equal(codes, model.int8_head.codes) and torch.equal(scales, model.int8_head.scales)
    if plain.model.lm_head is None:  # tied: the dequantized head must not change the embedding
        plain.model.lm_head = torch.nn.Linear(codes.shape[1], codes.shape[0], bias=False)
    with torch.no_grad():
        plain.model.lm_head.weight.copy_(codes.float() * scales[:, None])
    want = _run(plain)
    assert {i: t for i, (t, _) in got.items()} == {i: t for i, (t, _) in want.items()}
    for i in got:
        torch.testing.assert_close(torch.tensor(got[i][1]), torch.tensor(want[i][1]), rtol=0, atol=1e-4)


def test_lm_head_choice_is_checked():
    with pytest.raises(ValueError, match="lm_head must be one of"):
        EngineConfig(lm_head="fp4")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_int8_head_in_decode_graphs_matches_eager(tmp_path):
    """On CUDA the head runs the Triton kernel, inside the decode graphs too: graphed and eager
    engines give the same tokens."""
    # head_dim 64: the 16-bit decode kernel (and so the decode graphs) take it
    path = write_tiny_model("llama", tmp_path / "llama", hidden_size=256, intermediate_size=512,
                            num_attention_heads=4, num_key_value_heads=2)
    out = {}
    for graphs in (False, True):
        loaded = load_model(path, device="cuda")
        engine = LLMEngine(loaded.model, loaded.scheme, EngineConfig(num_pages=32, use_cuda_graphs=graphs,
                                                                       max_graph_batch=8, lm_head="int8"))
        assert (engine.runner.graphs is not None) == graphs, engine.runner.graphs_error
        assert loaded.model.int8_head.kernel is not None
        g = torch.Generator().manual_seed(0)
        for i, n in enumerate((3, 40, 9)):
            engine.add_request(str(i), torch.randint(0, 320, (n,), generator=g).tolist(), PARAMS)
        out[graphs] = {str(i): [] for i in range(3)}
        for d in engine.stream():
            out[graphs][d.request_id].extend(d.new_token_ids)
    assert out[True] == out[False]
