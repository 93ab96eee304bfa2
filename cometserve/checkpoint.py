"""The on-disk contract between the offline quantizer and the server: safetensors + quant_config.json.

A checkpoint directory holds the source model's config.json and tokenizer files, `model.safetensors`
and `quant_config.json`:

    {"format": "cometserve", "format_version": 1, "packing": "int4-lo-hi",
     "scheme": {...QuantScheme...}, "dtype": "bfloat16",
     "layers": {"model.layers.0.self_attn.qkv_proj": {"in_features": 576, "out_features": 960,
                "w_bits": 4, "w_group_size": 128, "block_bits": [8, 4, 4, 4, 4] | null,
                "perm": [...] | null, "perm_folded": false}, ...},
     "files": {"model.safetensors": {"bytes": ..., "sha256": ...}},
     "provenance": {"source_model": ..., "calibration": {...}, "seed": ..., "cometserve_version": ...}}

Only safetensors and JSON are ever read (never pickle). Every check fails with a CheckpointError
that names the field, file or tensor at fault.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cometserve.scheme import FORMAT_VERSION, QuantScheme, num_blocks

QUANT_CONFIG = "quant_config.json"
WEIGHTS = "model.safetensors"
PACKING = "int4-lo-hi"  # two signed 4-bit codes per byte, code 2i in the low nibble
HASH_LIMIT_BYTES = 8 << 30  # hash files up to this size at load; above, size checks only
SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja",
    "added_tokens.json",
)


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or does not match what it claims to be."""


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / QUANT_CONFIG).is_file()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def save(out_dir: str | Path, tensors: dict[str, torch.Tensor], quant_config: dict, source_dir: str | Path) -> Path:
    """Write a checkpoint atomically: everything goes to a temporary directory renamed into place, so
    an interrupted save never leaves a half-written checkpoint behind."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name in SIDE_FILES:
            if (Path(source_dir) / name).is_file():
                shutil.copy2(Path(source_dir) / name, tmp / name)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS))
        cfg = dict(quant_config)
        cfg.update(format="cometserve", format_version=FORMAT_VERSION, packing=PACKING)
        cfg["files"] = {WEIGHTS: {"bytes": (tmp / WEIGHTS).stat().st_size, "sha256": sha256_file(tmp / WEIGHTS)}}
        (tmp / QUANT_CONFIG).write_text(json.dumps(cfg, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_quant_config(path: str | Path) -> tuple[dict, QuantScheme]:
    """Read and validate quant_config.json (format, version, scheme, every layer entry)."""
    f = Path(path) / QUANT_CONFIG
    if not f.is_file():
        raise CheckpointError(f"{path}: no {QUANT_CONFIG}; not a cometserve checkpoint")
    try:
        cfg = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: not valid JSON ({e})") from e
    if cfg.get("format") != "cometserve":
        raise CheckpointError(f"{f}: field 'format' is {cfg.get('format')!r}, expected 'cometserve'")
    if cfg.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{f}: unknown format_version {cfg.get('format_version')!r}; this cometserve reads {FORMAT_VERSION}"
        )
    if cfg.get("packing") != PACKING:
        raise CheckpointError(f"{f}: field 'packing' is {cfg.get('packing')!r}, expected {PACKING!r}")
    try:
        scheme = QuantScheme.from_dict(cfg.get("scheme") or {})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{f}: field 'scheme': {e}") from e
    for name, layer in (cfg.get("layers") or {}).items():
        _check_layer(f, name, layer)
    return cfg, scheme


def _check_layer(f: Path, name: str, layer: dict) -> None:
    where = f"{f}: layers.{name}"
    for key in ("in_features", "out_features", "w_bits", "w_group_size", "block_bits", "perm", "perm_folded"):
        if key not in layer:
            raise CheckpointError(f"{where}: missing field {key!r}")
    k = layer["in_features"]
    if layer["w_bits"] not in (4, 8):
        raise CheckpointError(f"{where}.w_bits is {layer['w_bits']!r}, expected 4 or 8")
    bits = layer["block_bits"]
    if bits is not None and (len(bits) != num_blocks(k) or any(b not in (4, 8) for b in bits)):
        raise CheckpointError(f"{where}.block_bits must be {num_blocks(k)} values of 4 or 8, got {bits!r:.80}")
    perm = layer["perm"]
    if perm is not None and sorted(perm) != list(range(k)):
        raise CheckpointError(f"{where}.perm is not a permutation of 0..{k - 1}")


def load_tensors(path: str | Path, cfg: dict) -> dict[str, torch.Tensor]:
    """Load the weights after checking each listed file's size (truncation) and hash (corruption)."""
    f = checked_weights_file(path, cfg)
    try:
        return load_file(str(f))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{f}: unreadable safetensors ({e})") from e


def checked_weights_file(path: str | Path, cfg: dict) -> Path:
    """The weights file, after checking its size (truncation) and hash (corruption) against `cfg`."""
    files = cfg.get("files") or {}
    if WEIGHTS not in files:
        raise CheckpointError(f"{path}/{QUANT_CONFIG}: field 'files' does not list {WEIGHTS}")
    f = Path(path) / WEIGHTS
    meta = files[WEIGHTS]
    if not f.is_file():
        raise CheckpointError(f"{f}: file missing")
    size = f.stat().st_size
    if size != meta.get("bytes"):
        raise CheckpointError(f"{f}: {size} bytes, quant_config.json says {meta.get('bytes')} (truncated or replaced)")
    if size <= HASH_LIMIT_BYTES and sha256_file(f) != meta.get("sha256"):
        raise CheckpointError(f"{f}: sha256 does not match quant_config.json (file corrupted)")
    return f


def expect_tensor(tensors: dict[str, torch.Tensor], name: str, shape: tuple, dtype: torch.dtype | None) -> torch.Tensor:
    """The named tensor, after checking it exists with this shape and (if given) dtype."""
    if name not in tensors:
        raise CheckpointError(f"{WEIGHTS}: missing tensor {name!r}")
    t = tensors[name]
    if tuple(t.shape) != tuple(shape):
        raise CheckpointError(f"{WEIGHTS}: tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if dtype is not None and t.dtype != dtype:
        raise CheckpointError(f"{WEIGHTS}: tensor {name!r} has dtype {t.dtype}, expected {dtype}")
    return t
