"""Checkpoint round trip (exact) and every corruption case with its named error."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from cometserve import checkpoint
from cometserve.checkpoint import CheckpointError
from cometserve.model.loader import load_model
from cometserve.quant.quantize import quantize
from tests.tiny_models import write_tiny_model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    src = write_tiny_model("qwen2", d / "src")
    tokens = torch.randint(0, 320, (4, 64), generator=torch.Generator().manual_seed(0))
    return quantize(src, d / "q", scheme="fmpq_w4axkv4", calib_tokens=tokens, device="cpu")


def _copy(ckpt, tmp_path):
    dst = tmp_path / "c"
    shutil.copytree(ckpt, dst)
    return dst


def test_round_trip_is_exact(ckpt):
    cfg, scheme = checkpoint.load_quant_config(ckpt)
    assert scheme.name == "fmpq_w4axkv4" and cfg["format_version"] == 1
    saved = load_file(str(ckpt / checkpoint.WEIGHTS))
    model = load_model(ckpt, device="cpu").model
    state = model.state_dict()
    for name, t in saved.items():
        if t.dtype in (torch.uint8, torch.int8, torch.float16):
            assert torch.equal(state[name], t), name
        else:
            assert torch.equal(state[name], t.float()), name  # bf16 -> fp32 is exact
    layer = cfg["layers"]["model.layers.0.self_attn.qkv_proj"]
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert qkv.perm.tolist() == layer["perm"] and qkv.block_bits.tolist() == layer["block_bits"]
    assert cfg["layers"]["model.layers.0.mlp.down_proj"]["perm_folded"] is True
    assert model.model.layers[0].mlp.down_proj.perm is None  # folded into gate/up rows
    assert cfg["provenance"]["calibration"]["seed"] == 0


def _edit_config(path, fn):
    f = path / checkpoint.QUANT_CONFIG
    cfg = json.loads(f.read_text())
    fn(cfg)
    f.write_text(json.dumps(cfg))


def _rewrite_tensors(path, fn):
    f = path / checkpoint.WEIGHTS
    tensors = load_file(str(f))
    fn(tensors)
    save_file(tensors, str(f))
    _edit_config(path, lambda c: c["files"][checkpoint.WEIGHTS].update(
        bytes=f.stat().st_size, sha256=checkpoint.sha256_file(f)))


QKV = "model.layers.0.self_attn.qkv_proj"
CASES = {
    "unknown format version": (lambda p: _edit_config(p, lambda c: c.update(format_version=99)), "format_version 99"),
    "not a cometserve file": (lambda p: _edit_config(p, lambda c: c.update(format="gguf")), "'format'"),
    "bad scheme field": (lambda p: _edit_config(p, lambda c: c["scheme"].update(w_bits=3)), "w_bits"),
    "unknown scheme field": (lambda p: _edit_config(p, lambda c: c["scheme"].update(foo=1)), "foo"),
    "missing scheme field": (lambda p: _edit_config(p, lambda c: c["scheme"].pop("a_rotation")), "a_rotation"),
    "bad block map": (lambda p: _edit_config(p, lambda c: c["layers"][QKV].update(block_bits=[4])), "block_bits"),
    "bad permutation": (lambda p: _edit_config(p, lambda c: c["layers"][QKV]["perm"].__setitem__(0, 1)), "perm"),
    "missing layer field": (lambda p: _edit_config(p, lambda c: c["layers"][QKV].pop("w_bits")), "'w_bits'"),
    "truncated file": (lambda p: (p / checkpoint.WEIGHTS).write_bytes((p / checkpoint.WEIGHTS).read_bytes()[:-100]),
                       "truncated"),
    "flipped byte": (lambda p: _flip_byte(p / checkpoint.WEIGHTS), "sha256"),
    "missing tensor": (lambda p: _rewrite_tensors(p, lambda t: t.pop(f"{QKV}.qweight")), f"{QKV}.qweight"),
    "wrong shape": (lambda p: _rewrite_tensors(p, lambda t: t.update({f"{QKV}.w_scales": t[f"{QKV}.w_scales"][:, :1].contiguous()})),
                    "shape"),
    "wrong dtype": (lambda p: _rewrite_tensors(p, lambda t: t.update({f"{QKV}.qweight": t[f"{QKV}.qweight"].to(torch.int8)})),
                    "dtype"),
    "unexpected tensor": (lambda p: _rewrite_tensors(p, lambda t: t.update(extra=torch.zeros(1))), "unexpected"),
    "not json": (lambda p: (p / checkpoint.QUANT_CONFIG).write_text("{"), "not valid JSON"),
}


def _flip_byte(f):
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))


@pytest.mark.parametrize("case", sorted(CASES))
def test_corruption_is_named(ckpt, tmp_path, case):
    corrupt, needle = CASES[case]
    path = _copy(ckpt, tmp_path)
    corrupt(path)
    with pytest.raises(CheckpointError, match=None) as err:
        load_model(path, device="cpu")
    assert needle in str(err.value), str(err.value)


def test_config_shape_mismatch_is_named(ckpt, tmp_path):
    path = _copy(ckpt, tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 256
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="gate_up_proj"):
        load_model(path, device="cpu")
