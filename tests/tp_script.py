"""Greedy tokens from a tensor-parallel engine on CPU (gloo), as a separate program so that each launch
path gets a fresh process group (tests/test_tensor_parallel.py runs it):

    python tests/tp_script.py --launcher spawn MODEL PROMPTS_JSON OUT_JSON          (launch_engine)
    torchrun --standalone --nproc-per-node 2 tests/tp_script.py --launcher torchrun ...

PROMPTS_JSON holds a list of token-id lists; OUT_JSON gets {index: tokens} from rank 0."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# run as a script, this folder is sys.path[0]: its `kernels` test package would shadow the Hub's
# `kernels`, which transformers (5.2x) imports whenever a module of that name is importable
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

import torch

from cometserve.distributed.engine import ModelSpec, create_engine
from cometserve.distributed.launch import launch_engine, run_under_torchrun
from cometserve.engine.engine import EngineConfig
from cometserve.sampling_params import SamplingParams
from tests.tiny_models import engine_tokens

CONFIG = EngineConfig(num_pages=48, use_cuda_graphs=False, max_num_seqs=8)
PARAMS = SamplingParams(max_tokens=12, ignore_eos=True)


def generate(engine, prompts: list[list[int]]) -> dict[str, list[int]]:
    return engine_tokens(engine, prompts, PARAMS)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--launcher", choices=("spawn", "torchrun"), required=True)
    p.add_argument("model")
    p.add_argument("prompts")
    p.add_argument("out")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    prompts = json.loads(Path(args.prompts).read_text())
    spec = ModelSpec(path=args.model, dtype="float32")
    if args.launcher == "spawn":
        engine, workers = launch_engine(spec, 2, CONFIG, device="cpu")
        try:
            result = generate(engine, prompts)
        finally:
            workers.close()
    else:
        result = run_under_torchrun(lambda tp: generate(create_engine(tp, spec, CONFIG), prompts), device="cpu")
        if result is None:  # a worker rank
            return 0
    Path(args.out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
