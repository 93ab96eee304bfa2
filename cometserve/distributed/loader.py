"""Checkpoint -> one rank's shard of the model. Each rank opens the safetensors files lazily and reads
only its own rows or columns of every tensor (`safe_open(...).get_slice`), never the whole model.

Sources are the same as `model/loader.py`'s: a cometserve quantized checkpoint (size and hash
checked as there; the JSON block maps and permutations sliced per rank) or a Hugging Face directory
(q/k/v and gate/up read as the row concatenation of their parts, no copy of the fused tensor).
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from cometserve import checkpoint
from cometserve.checkpoint import CheckpointError
from cometserve.distributed.context import ParallelContext
from cometserve.distributed.layers import RowParallel, VocabParallelEmbedding
from cometserve.distributed.model import ShardedBuilder, TPLlamaForCausalLM, build_tp_model
from cometserve.distributed.sharding import WHOLE, LinearShard, Shard, layer_quant_shard
from cometserve.model.layers.linear import QuantLinear
from cometserve.model.llama import dense_factory
from cometserve.model.loader import (
    FUSED,
    LoadedModel,
    _to_device,
    default_dtype,
    hf_weight_files,
    load_hf_config,
    resolve_model_path,
)
from cometserve.scheme import PRESETS, QuantScheme

EXACT_DTYPES = (torch.uint8, torch.int8, torch.float16)  # codes and scales: must match, never cast


class ShardReader:
    """Named tensors of safetensors files, read in slices. With `fuse`, a Hugging Face part name
    (q_proj, k_proj, v_proj; gate_proj, up_proj) is read through its fused name (qkv_proj,
    gate_up_proj) as the concatenation of the parts' rows."""

    def __init__(self, files: list[Path], fuse: bool) -> None:
        self._stack = ExitStack()
        self._handles: dict[str, object] = {}
        for f in files:
            handle = self._stack.enter_context(safe_open(str(f), framework="pt"))
            for key in handle.keys():  # noqa: SIM118 - a safe_open handle is not iterable
                self._handles[key] = handle
        self._parts: dict[str, list[str]] = {}
        if fuse:
            for fused, parts in FUSED.items():
                for key in [k for k in self._handles if f".{parts[0]}." in k]:
                    names = [key.replace(f".{parts[0]}.", f".{p}.") for p in parts]
                    if all(n in self._handles for n in names):
                        self._parts[key.replace(f".{parts[0]}.", f".{fused}.")] = names

    def close(self) -> None:
        self._stack.close()

    def names(self) -> set[str]:
        fused_parts = {p for parts in self._parts.values() for p in parts}
        return (set(self._handles) - fused_parts) | set(self._parts)

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._parts:
            shapes = [self.shape(p) for p in self._parts[name]]
            return (sum(s[0] for s in shapes), *shapes[0][1:])
        if name not in self._handles:
            raise CheckpointError(f"{checkpoint.WEIGHTS}: missing tensor {name!r}")
        return tuple(self._handles[name].get_slice(name).get_shape())

    def narrow(self, name: str, dim: int, start: int, end: int) -> torch.Tensor:
        """full_tensor(name).narrow(dim, start, end - start), reading only that slice."""
        if name in self._parts:
            pieces, offset = [], 0
            for part in self._parts[name]:
                n = self.shape(part)[0]
                if dim != 0:
                    pieces.append(self.narrow(part, dim, start, end))
                elif start < offset + n and end > offset:
                    pieces.append(self.narrow(part, 0, max(start, offset) - offset, min(end, offset + n) - offset))
                offset += n
            return torch.cat(pieces, dim=dim)
        sl = self._handles[name].get_slice(name)
        index = [slice(None)] * len(sl.get_shape())
        index[dim] = slice(start, end)
        return sl[tuple(index)]


def quant_builder(layers: dict, scheme: QuantScheme, tp: ParallelContext) -> ShardedBuilder:
    """Per-rank QuantLinear layers from quant_config.json entries (16-bit where a layer has none)."""
    rotate = scheme.a_rotation == "hadamard"

    def build(name: str, in_features: int, out_features: int, bias: bool, shard: LinearShard):
        spec = layers.get(name)
        if spec is None:
            return dense_factory(name, in_features, out_features, bias), None
        if (spec["in_features"], spec["out_features"]) != (shard.in_full, shard.out_full):
            raise CheckpointError(
                f"quant_config.json: layers.{name} is {spec['in_features']}x{spec['out_features']}, "
                f"the model config says {shard.in_full}x{shard.out_full}")
        q = layer_quant_shard(spec, shard, tp.rank, tp.world_size)
        layer = QuantLinear(in_features, out_features, bias, spec["w_bits"], spec["w_group_size"],
                            q.block_bits is not None, q.perm is not None, rotate)
        with torch.no_grad():
            if q.block_bits is not None:
                layer.block_bits.copy_(torch.tensor(q.block_bits, dtype=torch.uint8))
            if q.perm is not None:
                layer.perm.copy_(torch.tensor(q.perm, dtype=torch.int32))
        return layer, q.input_index

    return build


def shard_targets(model: TPLlamaForCausalLM, shape_of):
    """(checkpoint name, local tensor, Shard) for every tensor the checkpoint provides to this rank;
    `shape_of(name)` is the full tensor's shape."""
    modules = dict(model.named_modules())
    vocab = model.vocab
    vocab_shard = Shard(0, ((vocab.start, vocab.end),), model.full_config.vocab_size, vocab.size)
    for key, tensor in model.state_dict(keep_vars=True).items():
        mod_name, param = key.rsplit(".", 1)
        module = modules[mod_name]
        if isinstance(module, QuantLinear) and param in ("perm", "block_bits"):
            continue  # from quant_config.json, already sliced by the builder
        parent_name = mod_name.rsplit(".", 1)[0]
        parent = modules.get(parent_name)
        if isinstance(parent, RowParallel) and module is parent.linear:
            name = f"{parent_name}.{param}"
            yield name, tensor, parent.tp_shard.tensor(param, tensor, shape_of(name))
        elif hasattr(module, "tp_shard"):
            yield key, tensor, module.tp_shard.tensor(param, tensor, shape_of(key))
        elif isinstance(module, VocabParallelEmbedding) or key == "lm_head.weight":
            yield key, tensor, vocab_shard
        else:
            yield key, tensor, WHOLE


@torch.no_grad()
def assign_shards(model: TPLlamaForCausalLM, reader: ShardReader, ignore: set[str] = frozenset()) -> None:
    """Copy this rank's slice of every tensor, checking full shapes and (codes, scales) dtypes;
    checkpoint tensors nothing reads are an error (`ignore` excepted). Floats are kept float32."""
    used = set()
    for name, target, shard in shard_targets(model, reader.shape):
        full = reader.shape(name)
        want = list(target.shape)
        if shard is not WHOLE:
            want[shard.dim] = shard.full
        if list(full) != want:
            raise CheckpointError(f"{checkpoint.WEIGHTS}: tensor {name!r} has shape {tuple(full)}, "
                                  f"expected {tuple(want)}")
        local = shard.take(lambda d, a, b, n=name: reader.narrow(n, d, a, b), full[shard.dim])
        exact = target.dtype in EXACT_DTYPES and not name.endswith(".bias")
        if exact and local.dtype != target.dtype:
            raise CheckpointError(f"{checkpoint.WEIGHTS}: tensor {name!r} has dtype {local.dtype}, "
                                  f"expected {target.dtype}")
        target.copy_(local if exact else local.to(torch.float32))
        used.add(name)
    extra = sorted(reader.names() - used - set(ignore))
    if extra:
        raise CheckpointError(f"{checkpoint.WEIGHTS}: unexpected tensor(s) {extra[:5]}")


def load_model_tp(path: str | Path, tp: ParallelContext, dtype: torch.dtype | None = None) -> LoadedModel:
    """This rank's shard of any supported model path, ready on `tp.device`."""
    dtype = dtype or default_dtype(tp.device)
    quantized = checkpoint.is_checkpoint(path)
    path = Path(path) if quantized else _resolve_once(path, tp)
    hf_config = load_hf_config(path)
    if quantized:
        qcfg, scheme = checkpoint.load_quant_config(path)
        files, build = [checkpoint.checked_weights_file(path, qcfg)], quant_builder(qcfg["layers"], scheme, tp)
    else:
        qcfg, scheme = None, PRESETS["fp16"]
        files, build = hf_weight_files(path), None
    model = build_tp_model(hf_config, tp, build, blocks=quantized)
    reader = ShardReader(files, fuse=not quantized)
    try:
        assign_shards(model, reader, {"lm_head.weight"} if model.lm_head is None and not quantized else set())
    finally:
        reader.close()
    _to_device(model, tp.device, dtype)
    return LoadedModel(model.eval(), hf_config, scheme, path, qcfg)


def _resolve_once(path: str | Path, tp: ParallelContext) -> Path:
    """resolve_model_path on every rank, rank 0 first: it converts a GGUF file once, the others then
    find the converted copy. Every rank passes the barrier exactly once, failing or not."""
    if tp.is_driver:
        try:
            return resolve_model_path(path)
        finally:
            tp.barrier()
    tp.barrier()
    return resolve_model_path(path)
