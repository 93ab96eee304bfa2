"""The tensor-parallel engine: one process per GPU; rank 0 schedules, every rank runs the model.

Rank 0 runs an ordinary `LLMEngine` whose runner is wrapped in a `DriverRunner`: before each step it
broadcasts the step's `SchedulerOutput` (and the requests whose runner state was released since the
previous step) over the gloo control group, then launches its own shard. Every other rank launches
the same `ModelRunner.launch` on the same SchedulerOutput, so the collectives inside the forward line
up and the sequence-slot bookkeeping of every rank stays identical. Logits are all-gathered, so every
rank holds the same full logits; only rank 0's samples reach the scheduler, and every rank's sampled
tokens are replaced by rank 0's on the device (`ModelRunner.share_samples`, one NCCL broadcast).
So async scheduling works as with one GPU: rank 0 schedules and broadcasts step N+1 while step N runs,
and the decodes of N+1 whose token N samples (PLACEHOLDER) get the same token on every rank. A worker
waits for step N only after launching N+1.

Workers are driven entirely by rank 0's control messages (pickled: small Python objects only;
weights and checkpoints are never pickled):

    ("build", ModelSpec, EngineConfig)   load this rank's shard, build its engine (KV cache, graphs)
    ("step", releases, SchedulerOutput)  run one step
    ("free",)                            drop the engine and the model
    ("exit",)                            leave `worker_loop`

The KV cache of every rank holds its own KV heads; the number of pages is agreed (the minimum over
ranks of what each GPU's free memory allows) so rank 0's block manager fits every rank. Decode CUDA
graphs are captured by every rank together (the all-reduces and all-gathers are inside them); if a
capture fails cleanly on any rank, every rank runs eagerly. A capture that fails halfway on one rank
only would leave the others waiting in a collective until DATA_TIMEOUT: not seen, not handled.
"""

from __future__ import annotations

import dataclasses
import gc
import traceback
from dataclasses import dataclass

import torch

from cometserve.distributed.context import ParallelContext
from cometserve.engine.engine import EngineConfig, LLMEngine, _reserve_bytes
from cometserve.engine.interfaces import SchedulerOutput, StepOutput
from cometserve.engine.kv_storage import page_bytes, pages_for_memory
from cometserve.engine.runner import InFlight, ModelRunner, PendingSample
from cometserve.model.layers.lm_head import use_lm_head
from cometserve.model.loader import LoadedModel, default_dtype


@dataclass(frozen=True)
class ModelSpec:
    """What every rank builds its shard of: a model path (cometserve checkpoint, Hugging Face
    directory or GGUF file) or random weights of a named shape (`random_model.py`, `mode` bf16 |
    w4a8kv4 | w4axkv4). `dtype`: a torch dtype name, None for the device's default."""

    path: str | None = None
    random_weights: str | None = None
    mode: str = "w4axkv4"
    dtype: str | None = None
    seed: int = 0
    rotate: bool | None = None

    def __post_init__(self) -> None:
        if (self.path is None) == (self.random_weights is None):
            raise ValueError("ModelSpec needs exactly one of path and random_weights")
        if self.dtype is not None and not isinstance(getattr(torch, self.dtype, None), torch.dtype):
            raise ValueError(f"ModelSpec.dtype {self.dtype!r} is not a torch dtype name")


def build_shard(spec: ModelSpec, tp: ParallelContext) -> LoadedModel:
    """This rank's shard of the model `spec` names, on tp.device."""
    dtype = getattr(torch, spec.dtype) if spec.dtype else default_dtype(tp.device)
    if spec.random_weights is not None:
        from cometserve.engine.random_model import build_random_model

        return build_random_model(spec.random_weights, spec.mode, device=tp.device, dtype=dtype,
                                  seed=spec.seed, rotate=spec.rotate, tp=tp)
    from cometserve.distributed.loader import load_model_tp

    return load_model_tp(spec.path, tp, dtype)


class DriverRunner:
    """Rank 0's runner: broadcasts each step to the workers, then runs its own shard. Any other
    attribute (graphs, attn, generators, storage, ...) is the wrapped ModelRunner's."""

    async_ok = True  # launch() / collect() may be split by the next step's launch, as ModelRunner's

    def __init__(self, runner, tp: ParallelContext) -> None:
        self.inner = runner
        self.tp = tp
        self._released: list[tuple[list[str], bool]] = []

    def execute(self, out: SchedulerOutput) -> StepOutput:
        return self.inner.collect(self.launch(out))

    def launch(self, out: SchedulerOutput, defer: frozenset[str] = frozenset()) -> InFlight | PendingSample | None:
        """Every rank runs the step; the workers sample deferred rows unconstrained, since rank 0's
        samples replace theirs (its finish() makes the broadcast they wait in)."""
        releases, self._released = self._released, []
        self.tp.broadcast_object(("step", releases, out))
        return self.inner.launch(out, defer)

    def release(self, request_ids, keep_generators: bool = False) -> None:
        ids = list(request_ids)
        self._released.append((ids, keep_generators))
        self.inner.release(ids, keep_generators)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def _agree_num_pages(model, scheme, config: EngineConfig, tp: ParallelContext) -> EngineConfig:
    """On CUDA without a fixed num_pages: the fewest pages any rank's free memory allows."""
    if config.num_pages is not None or tp.device.type != "cuda":
        return config
    c = model.config
    page = config.page_size or (scheme.kv_group_size if scheme.kv_bits == 4 else 64)
    per_page = page_bytes(scheme.kv_bits, c.num_layers, c.num_kv_heads, c.head_dim, page, scheme.kv_group_size,
                          model.model.embed_tokens.weight.dtype)
    try:
        pages = pages_for_memory(per_page, tp.device, config.memory_fraction, _reserve_bytes(model, config)) - 1
    except RuntimeError:
        pages = 0  # agreed below, so that every rank raises instead of some waiting forever
    pages = tp.min_int(pages)
    if pages < 1:
        raise RuntimeError(f"no room for the KV cache on at least one of the {tp.world_size} GPUs")
    return dataclasses.replace(config, num_pages=pages)


def build_engine(spec: ModelSpec, config: EngineConfig, tp: ParallelContext, tokenizer=None) -> LLMEngine:
    """Every rank, together: this rank's shard of `spec` and the engine over it. A model that fails
    to build on any rank (a shape that does not split, a bad checkpoint) fails on every rank,
    before any collective of the model runs: rank 0 re-raises, the workers wait for the next build."""
    error = None
    try:
        loaded = build_shard(spec, tp)
    except Exception as e:  # noqa: BLE001 - agreed on below, then re-raised
        error = e
    if tp.min_int(0 if error else 1) == 0:
        if error is not None:
            raise error
        raise RuntimeError("building the model failed on another rank (see that rank's error)")
    use_lm_head(loaded.model, config.lm_head)  # before the cache is sized from free memory
    # piecewise graphs would hold the layers' all-reduces too; not run on several GPUs yet: eager
    config = _agree_num_pages(loaded.model, loaded.scheme, dataclasses.replace(config, max_piecewise_tokens=0), tp)
    engine = LLMEngine(loaded.model, loaded.scheme, config, tokenizer)
    if tp.world_size > 1:
        engine.runner.share_samples = tp.broadcast_tensor
    if config.use_cuda_graphs and tp.device.type == "cuda":
        captured = tp.min_int(int(engine.runner.graphs is not None))
        if not captured and engine.runner.graphs is not None:  # one rank failed: all run eagerly
            engine.runner.graphs = None
            engine.runner.graphs_error = "CUDA graphs failed on another rank"
    engine.loaded = loaded
    return engine


def create_engine(tp: ParallelContext, spec: ModelSpec, config: EngineConfig | None = None,
                  tokenizer=None) -> LLMEngine:
    """Rank 0: have every worker build its shard and engine, build rank 0's, and return rank 0's
    engine, used exactly like a single-process LLMEngine (add_request, step, stream, abort).
    `engine.loaded` is rank 0's LoadedModel. Call `free_engine` before building another."""
    if not tp.is_driver:
        raise RuntimeError("create_engine runs on rank 0; the other ranks run worker_loop")
    config = config or EngineConfig()
    tp.broadcast_object(("build", spec, config))
    engine = build_engine(spec, config, tp, tokenizer)
    engine.runner = DriverRunner(engine.runner, tp)
    return engine


def free_engine(tp: ParallelContext) -> None:
    """Rank 0: the workers drop their engine and model (rank 0 drops its own references)."""
    tp.broadcast_object(("free",))
    _collect()


def stop_workers(tp: ParallelContext) -> None:
    """Rank 0: every worker leaves `worker_loop`."""
    tp.broadcast_object(("exit",))


def worker_loop(tp: ParallelContext) -> None:
    """Ranks > 0: follow rank 0's control messages until ("exit",)."""
    engine = flight = None
    while True:
        msg = tp.broadcast_object(None)
        kind = msg[0]
        if kind == "step":
            for ids, keep in msg[1]:
                engine.runner.release(ids, keep)
            launched = engine.runner.launch(msg[2])
            ModelRunner.collect(flight)  # the previous step (rank 0 waits for it about now too); samples dropped
            flight = launched
            continue
        ModelRunner.collect(flight)  # no step outlives its engine
        flight = None
        if kind == "build":
            engine = None
            _collect()
            try:
                engine = build_engine(msg[1], msg[2], tp)
            except Exception:  # noqa: BLE001 - rank 0 raised it too (build_engine agrees on failure)
                traceback.print_exc()
        elif kind == "free":
            engine = None
            _collect()
        elif kind == "exit":  # destroy_parallel collects the engine before leaving the group
            return
        else:
            raise RuntimeError(f"unknown control message {kind!r}")


def _collect() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
