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


def test_llm_chat_token_prompts_and_per_prompt_params(smollm2):
    """LLM.chat (one conversation or several), a {"prompt_token_ids": ...} prompt and a list of
    SamplingParams give what a chat-templated string prompt gives; mismatched inputs are refused."""
    llm = LLM(smollm2, device="cpu")
    q = "What is the capital of France?"
    by_text = llm.generate(q, GREEDY, chat=True, use_tqdm=False)[0]
    by_chat = llm.chat([{"role": "user", "content": q}], GREEDY, use_tqdm=False)[0]
    by_ids = llm.generate({"prompt_token_ids": by_text.prompt_token_ids}, GREEDY, use_tqdm=False)[0]
    assert by_chat.prompt_token_ids == by_text.prompt_token_ids
    assert by_chat.outputs[0].token_ids == by_text.outputs[0].token_ids == by_ids.outputs[0].token_ids
    convs = [[{"role": "user", "content": q}],
             [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": q}]]
    outs = llm.chat(convs, [GREEDY, SamplingParams(max_tokens=3)], use_tqdm=False)
    assert outs[0].outputs[0].token_ids == by_chat.outputs[0].token_ids
    assert 0 < len(outs[1].outputs[0].token_ids) <= 3 and outs[1].prompt_token_ids != by_chat.prompt_token_ids
    with pytest.raises(ValueError, match="2 prompts"):
        llm.generate(["a", "b", "c"][:2], [GREEDY], use_tqdm=False)
    with pytest.raises(ValueError, match="prompt_token_ids"):
        llm.generate({"prompt": "a"}, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="token ids"):
        llm.generate({"prompt_token_ids": [1, 10**7]}, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="messages"):
        llm.chat([], GREEDY, use_tqdm=False)


def test_min_tokens_holds_back_eos(smollm2):
    """min_tokens masks EOS until that many tokens exist: the short greedy answer continues past its
    EOS (the same tokens up to there), and only then may it stop."""
    llm = LLM(smollm2, device="cpu")
    q = "What is the capital of France?"
    short = llm.generate(q, SamplingParams(max_tokens=48), chat=True, use_tqdm=False)[0].outputs[0]
    assert short.finish_reason == "stop" and len(short.token_ids) < 40, short  # ended on EOS
    n = len(short.token_ids) + 4
    longer = llm.generate(q, SamplingParams(max_tokens=48, min_tokens=n), chat=True, use_tqdm=False)[0].outputs[0]
    assert len(longer.token_ids) >= n and longer.token_ids[: len(short.token_ids)] == short.token_ids


def test_n_completions_per_prompt(smollm2):
    """SamplingParams(n=...): n completions per prompt, completion i as a lone request seeded seed + i."""
    llm = LLM(smollm2, device="cpu")
    q = "Write a word."
    params = SamplingParams(n=3, max_tokens=6, temperature=1.0, seed=11)
    outs = llm.generate([q, q], params, chat=True, use_tqdm=False)
    assert [len(o.outputs) for o in outs] == [3, 3]
    assert [c.token_ids for c in outs[0].outputs] == [c.token_ids for c in outs[1].outputs]
    assert len({tuple(c.token_ids) for c in outs[0].outputs}) > 1
    lone = llm.generate(q, SamplingParams(max_tokens=6, temperature=1.0, seed=13), chat=True, use_tqdm=False)
    assert lone[0].outputs[0].token_ids == outs[0].outputs[2].token_ids
    with pytest.raises(ValueError, match="n=2"):
        llm.engine().add_request("x", [1, 2], SamplingParams(n=2))
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=-1)
