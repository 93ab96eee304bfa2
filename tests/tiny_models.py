"""Tiny random LLaMA-family checkpoints written to disk, for shapes and parity tests."""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("llama", "mistral", "qwen2")


def tiny_hf_config(family: str, **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = {
        "vocab_size": 320, "hidden_size": 192, "intermediate_size": 320, "num_hidden_layers": 2,
        "num_attention_heads": 6, "num_key_value_heads": 2, "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    }
    common.update(overrides)
    if family == "llama":
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 128, "rope_theta": 500000.0}
        return LlamaConfig(rope_scaling=rope, **common)
    if family == "mistral":
        return MistralConfig(sliding_window=None, **common)
    return Qwen2Config(**{**common, "tie_word_embeddings": True})


def shrunk_config(out: Path, name: str = "llama-3-8b", **overrides) -> Path:
    """A shipped `--random-weights` config (engine/random_model.py) with fields overridden, written as
    out/config.json; returns `out` (build_random_model takes it)."""
    import json

    from cometserve.engine.random_model import config_path

    cfg = {**json.loads(config_path(name).read_text()), **overrides}
    (out / "config.json").write_text(json.dumps(cfg))
    return out


# the small Llama-3-8B-shaped model of the GPU engine tests (head layout and GQA of the real one)
SMALL_8B = {"hidden_size": 1024, "intermediate_size": 2048, "num_hidden_layers": 2, "num_attention_heads": 8,
            "num_key_value_heads": 2, "vocab_size": 4096}


def tiny_with_smollm2_tokenizer(out: Path, **overrides) -> Path:
    """A tiny random Llama of SmolLM2's vocabulary with SmolLM2's tokenizer and chat template, in
    `out`; skips the test where the shipped model is not installed."""
    import shutil

    import pytest

    from cometserve import assets

    try:
        tokenizer_dir = assets.smollm2_dir()
    except RuntimeError as e:
        pytest.skip(f"shipped SmolLM2 tokenizer not installed: {e}")
    src = write_tiny_model("llama", out, vocab_size=49152, **overrides)
    for f in tokenizer_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name == "chat_template.jinja":
            shutil.copy(f, src / f.name)
    return src


def byte_tokenizer():
    """A byte-level tokenizer of 256 byte tokens and an EOS (id 256), for the tiny 320-token models:
    structured outputs need a tokenizer's bytes (ids 257+ have none)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from cometserve.structured.vocab import _byte_level_decoder

    tok = Tokenizer(models.BPE(vocab={c: b for c, b in _byte_level_decoder().items()}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def write_tiny_model(family: str, out: Path, seed: int = 0, **overrides) -> Path:
    """A random HF model of `family` saved as safetensors in `out`; returns `out`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_hf_config(family, **overrides)
    model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    # default init is tiny (std 0.02): widen it so that logits differ visibly between tokens
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def engine_tokens(engine, prompts: list[list[int]], params) -> dict[str, list[int]]:
    """Queue every prompt (request id = its index), run the engine to the end: {index: tokens}."""
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), ids, params)
    out: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    for d in engine.stream():
        out[d.request_id].extend(d.new_token_ids)
    return out


def teacher_forced(engine, prompts: list[list[int]], tokens: dict[str, list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """`engine` scores each prompt + its continuation tokens[index] in one prefill. Per continuation
    token, in prompt order: its log-probability, and the top log-probability at its position (equal
    where `engine` would have picked it greedily; a few nats above for a random token)."""
    from cometserve.sampling_params import SamplingParams

    for i, ids in enumerate(prompts):
        engine.add_request(str(i), ids + tokens[str(i)], SamplingParams(max_tokens=1, prompt_logprobs=1))
    scored = {d.request_id: d.prompt_logprobs for d in engine.stream() if d.prompt_logprobs is not None}
    pairs = [(lp, max(lp, *(a for _, a in alts))) for i, ids in enumerate(prompts) for lp, alts in scored[str(i)][len(ids):]]
    return torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
