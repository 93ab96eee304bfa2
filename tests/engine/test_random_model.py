"""`--random-weights`: every shipped config loads as its own transformers class, and a shrunken copy
of the Qwen2 and Mistral shapes (the families beyond Llama) builds and generates through the engine
on CPU in each mode."""

from __future__ import annotations

import pytest
import torch

from cometserve.config import ModelConfig
from cometserve.engine.engine import EngineConfig, LLMEngine
from cometserve.engine.random_model import MODEL_NAMES, build_random_model, config_path, load_config
from cometserve.sampling_params import SamplingParams
from tests.tiny_models import shrunk_config


def test_shipped_configs_load_as_their_family():
    kinds = {n: (type(load_config(n)).__name__, ModelConfig.from_hf(load_config(n))) for n in MODEL_NAMES}
    assert kinds["llama-3-8b"][0] == "LlamaConfig" and not kinds["llama-3-8b"][1].qkv_bias
    assert kinds["qwen2-7b"][0] == "Qwen2Config" and kinds["qwen2-7b"][1].qkv_bias  # Qwen2's q/k/v biases
    assert kinds["qwen2-7b"][1].num_heads // kinds["qwen2-7b"][1].num_kv_heads == 7
    assert kinds["mistral-7b"][0] == "MistralConfig" and kinds["mistral-7b"][1].sliding_window is None
    with pytest.raises(FileNotFoundError, match="qwen2-7b"):
        config_path("no-such-model")


@pytest.mark.parametrize("name", ["qwen2-7b", "mistral-7b"])
@pytest.mark.parametrize("mode", ["bf16", "w4axkv4"])
def test_small_copies_build_and_generate(name, mode, tmp_path):
    real = load_config(name)
    heads, kv = real.num_attention_heads // 4, real.num_key_value_heads // 4  # the same GQA ratio
    path = shrunk_config(tmp_path, name, hidden_size=128 * heads, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=512)
    loaded = build_random_model(path, mode, device="cpu", dtype=torch.float32)
    biases = [m.bias is not None for n, m in loaded.model.named_modules() if n.endswith("qkv_proj")]
    assert biases and all(biases) == (name == "qwen2-7b")
    engine = LLMEngine(loaded.model, loaded.scheme, EngineConfig(num_pages=16, use_cuda_graphs=False, max_num_seqs=4))
    engine.add_request("a", list(range(1, 40)), SamplingParams(max_tokens=5, ignore_eos=True))
    out = [d for d in engine.stream() if d.finished]
    assert out[0].finish_reason == "length" and engine.scheduler.kv.num_free_blocks == engine.scheduler.kv.num_blocks
