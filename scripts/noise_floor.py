"""How many greedy tokens of the random 2-layer model of tests/engine's GPU agreement test survive a
tiny perturbation of the attention output (the size of kernel-vs-reference rounding differences)?
CPU, reference path: `python scripts/noise_floor.py w4axkv4` (or bf16). Explains that test's xfail."""

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cometserve.engine.llm import generate_reference
from cometserve.engine.random_model import build_random_model, config_path
from cometserve.model import plain_cache
from cometserve.sampling_params import SamplingParams


def main() -> None:
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp())
    cfg = json.loads(config_path("llama-3-8b").read_text())
    cfg.update(hidden_size=1024, intermediate_size=2048, num_hidden_layers=2, num_attention_heads=8,
               num_key_value_heads=2, vocab_size=4096, max_position_embeddings=4096)
    (tmp / "config.json").write_text(json.dumps(cfg))
    mode = sys.argv[1] if len(sys.argv) > 1 else "w4axkv4"
    loaded = build_random_model(tmp, mode, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        loaded.model.lm_head.weight.mul_(3.0)
    g = torch.Generator().manual_seed(0)
    batch = [torch.randint(0, 320, (n,), generator=g).tolist() for n in (5, 63, 64, 200, 1, 130)]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    orig = plain_cache.LayerCache.attend
    gen = torch.Generator()

    def run(rel):
        def noisy(self, q, k, v, positions, scale):
            out = orig(self, q, k, v, positions, scale)
            return out + rel * out.abs().mean() * torch.randn(out.shape, generator=gen)
        plain_cache.LayerCache.attend = noisy if rel else orig
        return [generate_reference(loaded.model, loaded.scheme, p, params).token_ids for p in batch]

    gen.manual_seed(1)
    want = run(0.0)
    for rel in (1e-3, 3e-3, 1e-2):
        got = run(rel)
        first = sum(a[0] == b[0] for a, b in zip(got, want))
        same = sum(x == y for a, b in zip(got, want) for x, y in zip(a, b))
        print(f"{mode} noise {rel:g} x mean|attn out|: first tokens {first}/6, all tokens {same}/{6 * 24}", flush=True)


if __name__ == "__main__":
    main()
