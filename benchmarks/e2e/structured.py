"""Structured outputs: what constraining completions costs.

    PYTHONPATH=. python3 benchmarks/e2e/structured.py [--random-weights llama-3-8b] [--batch 32]

Host side (the engine's thread does this work): compile time of three grammars (any JSON object,
a pydantic-like schema, a "required" tool call over two tools) and the allowed-token mask's time for
a DFA state met for the first time (then cached), over SmolLM2's 49k-token vocabulary and over a
128k one (SmolLM2's tokens plus byte-string variants: Llama 3's vocabulary size).
Sampling: a step's 32 and 256 rows in one batch against row by row (the engine's sampler before and
after session 24). Engine: `--batch` requests decoding `--output-len` tokens (temperature 1, seeded, EOS ignored) of
which none, one, half and all are structured (persons as JSON lines, without end), async
scheduling on; and all structured with it off. Each engine compiles the grammar before the clock
starts; its masks are computed as the requests meet new states. Random weights of `--random-weights` on CUDA (the tiny test shape on CPU) with
SmolLM2's tokenizer (ids past its 49152 tokens have no bytes: never allowed). Writes structured.json and a
dated markdown table into --out-dir.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cometserve.engine.engine import EngineConfig, LLMEngine
from cometserve.sampling_params import SamplingParams, StructuredOutputsParams
from cometserve.structured.grammar import GrammarCompiler
from cometserve.structured.json_schema import schema_to_regex
from cometserve.structured.regex import compile_regex
from cometserve.structured.vocab import TokenIndex, token_bytes

PERSON = {"$defs": {"Pet": {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]},
                                                              "legs": {"type": "integer", "minimum": 0, "maximum": 4}},
                            "required": ["kind", "legs"]}},
          "type": "object", "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"},
                                           "email": {"type": "string"}, "pets": {"type": "array", "items": {"$ref": "#/$defs/Pet"}}},
          "required": ["name", "age"]}
TOOLS = {"type": "array", "minItems": 1, "items": {"anyOf": [
    {"type": "object", "properties": {"name": {"const": "get_weather"}, "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city"]}}, "required": ["name", "parameters"]},
    {"type": "object", "properties": {"name": {"const": "search"}, "parameters": {
        "type": "object", "properties": {"query": {"type": "string"}, "top_k": {"type": "integer", "minimum": 1,
                                                                               "maximum": 50}},
        "required": ["query"]}}, "required": ["name", "parameters"]}]}}
GRAMMARS = {"json_object": StructuredOutputsParams(json_object=True), "person schema": StructuredOutputsParams(json=PERSON),
            "2-tool call": StructuredOutputsParams(json=TOOLS),
            # a long repeat: the automaton is left unminimized (regex.MAX_REFINE_ROUNDS)
            "20+ persons": StructuredOutputsParams(json={
                "$defs": PERSON["$defs"], "type": "array", "minItems": 20,
                "items": {k: v for k, v in PERSON.items() if k != "$defs"}})}
SAMPLE = '{"name": "Alice", "age": 31, "pets": [{"kind": "cat", "legs": 4}], "email": "a@b.c"}'


# the engine runs' grammar: persons as JSON lines, without end, so every request runs to --output-len
JSONL = StructuredOutputsParams(regex=f"(?:{schema_to_regex(PERSON)}\n)+")


def host_costs(tokenizer) -> tuple[list[dict], list[dict]]:
    """(compile rows, mask rows)."""
    compiled = []
    for name, spec in GRAMMARS.items():
        t0 = time.perf_counter()
        pattern = spec.regex_pattern()
        dfa = compile_regex(pattern)
        compiled.append({"grammar": name, "regex_chars": len(pattern), "dfa_states": dfa.num_states,
                         "compile_s": time.perf_counter() - t0})
    small = token_bytes(tokenizer, len(tokenizer))
    real = [t for t in small if t]
    rng = random.Random(0)
    large = small + [rng.choice(real) + rng.choice(real)[:3] for _ in range(128256 - len(small))]
    dfa = compile_regex(GRAMMARS["json_object"].regex_pattern())
    states, s = [], dfa.start
    for ch in SAMPLE:  # the states a typical output passes through
        states.append(s)
        s = dfa.run(ch.encode(), s)
    states = list(dict.fromkeys(states))
    masks = []
    for vocab in (small, large):
        index = TokenIndex(vocab)
        ms = []
        for st in states:
            t0 = time.perf_counter()
            index.allowed(dfa.trans, st)
            ms.append((time.perf_counter() - t0) * 1e3)
        masks.append({"vocab": len(vocab), "states": len(states), "ms_mean": float(np.mean(ms)),
                      "ms_max": float(np.max(ms))})
    return compiled, masks


def sampler_costs(device: str) -> list[dict]:
    """A step's sampling of R rows over a 128k vocabulary (temperature 1, top-p 0.9; half the rows
    seeded), one batch (sampler.sample_rows, the engine's) against row by row (sample_tensor per row,
    the engine's path before session 24): median of 20 with events on CUDA, of 3 on a CPU."""
    from cometserve.engine.sampler import sample_rows, sample_tensor

    def batch(logits, params, gens):
        sample_rows(logits, params, gens, [None] * len(params), [()] * len(params), None)

    def one_by_one(logits, params, gens):
        for i, p in enumerate(params):
            sample_tensor(logits[i], p, gens[i])

    out = []
    for r in (32, 256):
        logits = torch.randn(r, 128256, device=device) * 3
        params = [SamplingParams(temperature=1.0, top_p=0.9, seed=i if i % 2 else None) for i in range(r)]
        gens = [torch.Generator(device=device).manual_seed(i) if p.seed is not None else None
                for i, p in enumerate(params)]
        out.append({"rows": r, "vocab": logits.shape[1],
                    **{f"{name} ms": _median_ms(fn, (logits, params, gens), device)
                       for name, fn in (("batch", batch), ("row by row", one_by_one))}})
    return out


def _median_ms(fn, args: tuple, device: str) -> float:
    fn(*args)  # warm
    ms = []
    for _ in range(20 if device == "cuda" else 3):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            end.synchronize()
            ms.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(*args)
            ms.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(ms))


def build_model(args, device: str):
    from cometserve.engine.random_model import build_random_model

    if device == "cuda":
        return build_random_model(args.random_weights, args.mode, device="cuda")
    from tests.tiny_models import shrunk_config

    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / "structured-bench"
    tmp.mkdir(exist_ok=True)
    small = {"hidden_size": 192, "intermediate_size": 320, "num_hidden_layers": 2, "num_attention_heads": 6,
             "num_key_value_heads": 2, "vocab_size": 49152}
    return build_random_model(shrunk_config(tmp, **small), args.mode, device="cpu", dtype=torch.float32)


def make_engine(loaded, tokenizer, args, device: str) -> LLMEngine:
    cfg = EngineConfig(max_num_seqs=args.batch, num_pages=None if device == "cuda" else 4 * args.batch,
                       use_cuda_graphs=device == "cuda")
    return LLMEngine(loaded.model, loaded.scheme, cfg, tokenizer=tokenizer)


def engine_run(engine: LLMEngine, tokenizer, args, num_structured: int, async_scheduling: bool, device: str) -> dict:
    """One timed run on `engine`, with a fresh grammar cache (masks computed as states are met)."""
    engine.config = dataclasses.replace(engine.config, async_scheduling=async_scheduling)
    engine.grammars = GrammarCompiler(tokenizer, engine.model.config.vocab_size)
    engine.grammars.grammar(JSONL)  # compiled before the clock, as the server does off the engine's thread
    g = torch.Generator().manual_seed(0)
    vocab = len(tokenizer)
    for i in range(args.batch):
        spec = JSONL if i < num_structured else None
        engine.add_request(f"r{i}", torch.randint(0, vocab, (args.input_len,), generator=g).tolist(),
                           SamplingParams(max_tokens=args.output_len, temperature=1.0, seed=i, ignore_eos=True,
                                          structured_outputs=spec))
    out_tokens, step_ms = 0, []
    t0 = time.perf_counter()
    while engine.has_unfinished():
        ts = time.perf_counter()
        out_tokens += sum(len(d.new_token_ids) for d in engine.step())
        step_ms.append((time.perf_counter() - ts) * 1e3)
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"structured": num_structured, "batch": args.batch, "async_scheduling": engine.async_scheduling,
            "output_tokens": out_tokens, "steps": len(step_ms), "output_tokens_per_s": out_tokens / dt,
            "step_ms_p50": float(np.median(step_ms))}


def meta(args, device: str) -> dict:
    import triton

    def git(*cmd):
        proc = subprocess.run(["git", *cmd], capture_output=True, text=True, cwd=ROOT, check=False)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({os.cpu_count()} cores), no GPU"
    smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                         text=True, check=False) if device == "cuda" else None
    return {"gpu": name, "driver": smi.stdout.split()[0] if smi and smi.returncode == 0 and smi.stdout else None,
            "torch": torch.__version__, "triton": triton.__version__,
            "commit": args.commit or git("rev-parse", "--short", "HEAD") or "unknown",
            "command": " ".join(["benchmarks/e2e/structured.py", *sys.argv[1:]]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def write(doc: dict, out_dir: Path, name: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = [f"# Structured outputs ({datetime.date.today()})", "", (f"{doc['gpu']} (driver {doc.get('driver') or 'none'}), torch {doc['torch']}, triton "
             f"{doc['triton']}, commit {doc['commit']}: `{doc['command']}`"), "",
             "| grammar | regex chars | DFA states | compile s |", "|---|---|---|---|"]
    lines += [f"| {r['grammar']} | {r['regex_chars']} | {r['dfa_states']} | {r['compile_s']:.2f} |" for r in doc["compile"]]
    lines += ["", "| vocabulary | states | mask ms, mean | max |", "|---|---|---|---|"]
    lines += [f"| {r['vocab']} | {r['states']} | {r['ms_mean']:.2f} | {r['ms_max']:.2f} |" for r in doc["masks"]]
    lines += ["", "Sampling a step's rows (temperature 1, top-p 0.9, half seeded, 128k vocabulary):", "",
              "| rows | one batch ms | row by row ms | ratio |", "|---|---|---|---|"]
    lines += [f"| {r['rows']} | {r['batch ms']:.2f} | {r['row by row ms']:.2f} | {r['row by row ms'] / r['batch ms']:.1f}x |"
              for r in doc["sampling"]]
    if doc["engine"]:
        lines += ["", f"Engine: {doc['model']}", "", ("| structured of batch | async | output tokens | steps | "
                  "output tok/s | step ms p50 | vs none |"), "|---|---|---|---|---|---|---|"]
        base = doc["engine"][0]["output_tokens_per_s"]
        lines += [f"| {r['structured']}/{r['batch']} | {r['async_scheduling']} | {r['output_tokens']} | {r['steps']} | "
                  f"{r['output_tokens_per_s']:.0f} | {r['step_ms_p50']:.2f} | {r['output_tokens_per_s'] / base:.2f}x |"
                  for r in doc["engine"]]
    (out_dir / f"{datetime.date.today()}-{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--random-weights", default="llama-3-8b")
    p.add_argument("--mode", default="w4axkv4")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--no-engine", action="store_true", help="host costs only")
    p.add_argument("--tokenizer", default=None, help="a tokenizer directory (default: the shipped SmolLM2's)")
    p.add_argument("--commit", default=None)
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--name", default="structured")
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    from cometserve import assets

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or assets.smollm2_dir())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    compiled, masks = host_costs(tokenizer)
    sampling = sampler_costs(device)
    rows, model = [], None
    if not args.no_engine:
        engine = make_engine(build_model(args, device), tokenizer, args, device)
        engine.warm_up()
        model = f"{args.random_weights if device == 'cuda' else 'tiny 2-layer (CPU)'} {args.mode}"
        runs = [(0, True), (1, True), (args.batch // 2, True), (args.batch, True), (args.batch, False)]
        for k, asyn in runs:
            rows.append(engine_run(engine, tokenizer, args, k, asyn, device))
    write({**meta(args, device), "model": model, "compile": compiled, "masks": masks, "sampling": sampling,
           "engine": rows},
          Path(args.out_dir), args.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
