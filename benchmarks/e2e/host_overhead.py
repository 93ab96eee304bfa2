"""Host (CPU) cost of a decode step at large batch, without the model forward.

    PYTHONPATH=. python benchmarks/e2e/host_overhead.py --batch 256,512

A tiny random LLaMA (the block manager, scheduler and runner metadata do not depend on the model's
size) with the real engine's page size and context limit (Llama-3-8B: 8192 tokens, 64-token pages).
For each batch size B: B requests of `--prompt` tokens are prefilled and decoded `--warm-steps`
times (context ~ prompt + warm steps), then decode steps are timed phase by phase exactly like
`profile_decode.timed_steps` (schedule, prepare, sample, update) except that the forward is skipped:
`runner.logits` is replaced by a fabricated result (one greedy token per sampled row), so `sample`
and `update` run on real shapes. `engine.step` is timed whole the same way (forward fabricated), which
adds the runner's releases and the engine's per-request deltas. Prints median ms per phase; writes
nothing (a diagnostic, not a benchmark of record). Run it on an otherwise idle machine, or compare
variants inside one process: timings on a busy CPU are noisy.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from profile_decode import engine_step_ms, timed_steps  # this script's folder is sys.path[0]

from cometserve.engine.engine import EngineConfig, LLMEngine
from cometserve.engine.random_model import build_random_model, load_config
from cometserve.sampling_params import SamplingParams

PHASES = ("schedule", "prepare", "sample", "update", "host total")


def tiny_model(mode: str, max_model_len: int):
    """A 1-layer LLaMA of width 128 whose context limit is the real model's."""
    base = json.loads(Path(ROOT / "cometserve/configs/llama-3-8b.json").read_text())
    base.update(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=1024, max_position_embeddings=max_model_len)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "config.json"
        path.write_text(json.dumps(base))
        load_config(path)  # fail here, not inside the builder, on a bad config
        return build_random_model(path, mode, device="cpu", dtype=torch.float32)


class FakeForward:
    """Stands in for `ModelRunner.logits`: greedy token `token` with logprob 0 for every sampled row,
    as the decode graph would return it (logits, (tokens, logprobs))."""

    def __init__(self, max_rows: int, vocab: int, token: int = 7) -> None:
        self.logits = torch.zeros(max_rows, vocab)
        self.tokens = torch.full((max_rows,), token, dtype=torch.int64)
        self.logprobs = torch.zeros(max_rows)

    def __call__(self, inputs):
        n = len(inputs.sample_rows)
        if n == 0:
            return None
        return self.logits[:n], (self.tokens[:n], self.logprobs[:n])


def host_steps(engine: LLMEngine, n: int) -> dict[str, float]:
    """profile_decode.timed_steps with the fabricated forward; "host total" leaves it out."""
    res = timed_steps(engine, n)
    res["host total"] = res["total"] - res["forward"]
    return res


def run_batch(loaded, args, b: int, profile: bool) -> dict[str, float]:
    pages_per_seq = -(-(args.prompt + args.warm_steps + 2 * args.steps + 8) // args.page_size)
    engine = LLMEngine(loaded.model, loaded.scheme, EngineConfig(
        max_num_seqs=b, num_pages=max(b * pages_per_seq, -(-args.max_model_len // args.page_size)) + 16, page_size=args.page_size,
        max_model_len=args.max_model_len, use_cuda_graphs=False))
    engine.runner.logits = FakeForward(b, loaded.model.config.vocab_size)
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=args.max_model_len - args.prompt, ignore_eos=True)
    for i in range(b):
        engine.add_request(f"r{i}", torch.randint(0, 1000, (args.prompt,), generator=g).tolist(), params)
    while engine.scheduler.num_waiting or any(r.num_output_tokens == 0 for r in engine.scheduler.running):
        engine.step()
    for _ in range(args.warm_steps):
        engine.step()
    res = host_steps(engine, args.steps)
    res["engine.step"] = engine_step_ms(engine, args.steps)
    ctx = engine.scheduler.running[0].num_tokens
    res["context"] = ctx
    if profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        host_steps(engine, args.steps)
        prof.disable()
        print(f"\n--- cProfile, batch {b}, {args.steps} steps ---")
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", default="256,512")
    p.add_argument("--mode", default="bf16", help="bf16 (16-bit KV) | w4axkv4 (INT4 KV)")
    p.add_argument("--prompt", type=int, default=1024)
    p.add_argument("--warm-steps", type=int, default=256, help="decode steps before timing (context growth)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--profile", action="store_true", help="also print a cProfile of the timed steps")
    args = p.parse_args()
    torch.set_num_threads(1)
    loaded = tiny_model(args.mode, args.max_model_len)
    rows = []
    for b in (int(x) for x in args.batch.split(",")):
        rows.append((b, run_batch(loaded, args, b, args.profile)))
    cols = (*PHASES, "engine.step")
    print(f"\nhost ms per decode step (median of {args.steps}), mode {args.mode}, page {args.page_size}, "
          f"forward skipped")
    print("| batch | context | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 2) + "|")
    for b, r in rows:
        print(f"| {b} | {r['context']:.0f} | " + " | ".join(f"{r[k]:.3f}" for k in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
