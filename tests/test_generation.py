"""End to end on the shipped model (SmolLM2-135M-Instruct): 16-bit greedy generation is stable and
sensible; the FMPQ W4AxKV4 checkpoint loads, generates, and keeps perplexity within a bound."""

from __future__ import annotations

import math

import pytest
import torch

from cometserve import assets
from cometserve.engine.llm import LLM
from cometserve.evaluate import perplexity
from cometserve.sampling_params import SamplingParams

# W4AxKV4 perplexity over 16-bit on held-out Austen. The quantizer should do far better than this
# bound (measured in benchmarks/results/accuracy.json); the test catches a broken pipeline.
PPL_RATIO_BOUND = 1.6
GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def smollm2():
    try:
        return assets.smollm2_dir()
    except RuntimeError as e:
        pytest.skip(f"shipped model not installed: {e}")


@pytest.fixture(scope="module")
def checkpoint_dir(smollm2):
    from cometserve.cli import demo_checkpoint

    return demo_checkpoint(device="cpu")


def test_16bit_greedy_is_stable_and_sensible(smollm2):
    llm = LLM(smollm2, device="cpu")
    first = llm.generate("What is the capital of France?", GREEDY, chat=True, use_tqdm=False)[0].outputs[0]
    again = llm.generate("What is the capital of France?", GREEDY, chat=True, use_tqdm=False)[0].outputs[0]
    assert first.token_ids == again.token_ids
    assert "Paris" in first.text


def test_quantized_generates_and_stays_close(smollm2, checkpoint_dir):
    _, eval_text = assets.default_eval_text()
    ppl = {}
    for label, path in (("16-bit", smollm2), ("w4axkv4", checkpoint_dir)):
        llm = LLM(path, device="cpu")
        ids = torch.tensor(llm.tokenizer(eval_text[:60000], add_special_tokens=False)["input_ids"])
        ppl[label] = perplexity(llm.model, llm.scheme, ids, ctx=256, max_windows=6, progress=False)
        out = llm.generate("What is the capital of France?", GREEDY, chat=True, use_tqdm=False)[0].outputs[0]
        assert out.token_ids and out.text.strip(), label
    assert llm.scheme.name == "fmpq_w4axkv4"
    assert math.isfinite(ppl["w4axkv4"])
    assert ppl["w4axkv4"] / ppl["16-bit"] <= PPL_RATIO_BOUND, ppl
