"""Linear layers: 16-bit, and quantized (W4Ax / W8A8 / weight-only) over the same call.

Every linear takes `forward(x, norm=None, gated=False, residual=None)`: the ops that precede it are
handed over so a quantized layer can fuse them into the activation quantization (one pass over x:
add, normalize, gather by the FMPQ permutation, quantize per token and 128-channel block). `norm`:
the RMSNorm before qkv and gate_up; `residual`: the layer's input is norm(x + residual), and the
call returns (y, x + residual) so the sum goes on down the residual stream; `gated`: x is
[gate | up] and the layer's input is silu(gate) * up (down_proj). A 16-bit layer just applies them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from cometserve.kernels import ref
from cometserve.model.layers.activation import silu_and_mul
from cometserve.model.layers.norm import RMSNorm
from cometserve.scheme import num_blocks, padded_k


class Linear(nn.Module):
    """16-bit linear. `observer(layer, x)` sees the exact input of the matmul (calibration)."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.observer: Callable[[Linear, torch.Tensor], None] | None = None

    def forward(self, x: torch.Tensor, norm: RMSNorm | None = None, gated: bool = False,
                residual: torch.Tensor | None = None):
        x, residual = _prologue(x, norm, gated, residual)
        if self.observer is not None:
            self.observer(self, x)
        y = nn.functional.linear(x, self.weight, self.bias)
        return y if residual is None else (y, residual)


class QuantLinear(nn.Module):
    """Integer weights with float16 scales. With a block map, activations are quantized per token and
    block (W4Ax, COMET section 3) and the product runs on integer codes; without one, the weights are
    dequantized once and the product is 16-bit (weight-only quantization).

    Buffers (checkpoint names): qweight uint8 [N, K_pad/2] (INT4) or int8 [N, K_pad] (INT8); w_scales
    float16 [N, G]; bias [N]; perm int32 [K] (absent when folded into the previous layer); block_bits
    uint8 [num_blocks].
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        w_bits: int,
        w_group_size: int,
        has_block_map: bool,
        has_perm: bool,
        rotate: bool = False,
    ) -> None:
        super().__init__()
        self.rotate = rotate  # INT4 activation blocks are Hadamard-rotated (scheme.a_rotation)
        self.in_features, self.out_features, self.w_bits = in_features, out_features, w_bits
        k_pad = padded_k(in_features)
        groups = 1 if w_group_size == 0 else k_pad // w_group_size
        if w_bits == 4:
            self.register_buffer("qweight", torch.zeros(out_features, k_pad // 2, dtype=torch.uint8))
        else:
            self.register_buffer("qweight", torch.zeros(out_features, k_pad, dtype=torch.int8))
        self.register_buffer("w_scales", torch.ones(out_features, groups, dtype=torch.float16))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nb = num_blocks(in_features)
        self.register_buffer("block_bits", torch.full((nb,), 4, dtype=torch.uint8) if has_block_map else None)
        self.register_buffer("perm", torch.arange(in_features, dtype=torch.int32) if has_perm else None)
        self._ops = None  # set by prepare(): the kernel module chosen for this device and shape
        self._dense: torch.Tensor | None = None

    @torch.no_grad()
    def prepare(self, dtype: torch.dtype) -> None:
        """Once, after the weights are on their device: pick the kernels and lay weights out for them.
        `dtype` is the activation dtype (used by the weight-only path's dequantized copy)."""
        if self.block_bits is None:
            w = ref.weight_codes(self.qweight).float()
            g = w.shape[1] // self.w_scales.shape[1]
            w = w * self.w_scales.float().repeat_interleave(g, dim=1)
            self._dense = w[:, : self.in_features].to(dtype)
            return
        self._ops = select_gemm_ops(self.out_features, self.in_features, self.w_bits, self.qweight.device,
                                    self.block_bits, dtype)
        self._qweight, self._w_scales = self._ops.prepare_weights(self.qweight, self.w_scales)

    def forward(self, x: torch.Tensor, norm: RMSNorm | None = None, gated: bool = False,
                residual: torch.Tensor | None = None):
        if self._dense is not None:
            x, residual = _prologue(x, norm, gated, residual)
            y = nn.functional.linear(x, self._dense, self.bias)
            return y if residual is None else (y, residual)
        if self._ops is None:
            raise RuntimeError("QuantLinear.prepare() must run after the weights are loaded")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        norm_w, eps = (norm.weight, norm.eps) if norm is not None else (None, 1e-6)
        r2 = residual.reshape(x2.shape) if residual is not None else None
        codes, scales, *total = self._ops.quant_act(x2, self.perm, self.block_bits, norm_w, eps, self.rotate, gated,
                                                    r2)
        y = self._ops.w4ax_gemm(codes, scales, self._qweight, self._w_scales, self.bias, x.dtype)
        y = y[: x2.shape[0]].reshape(*lead, self.out_features)
        return y if residual is None else (y, total[0].reshape(residual.shape))


def _prologue(x: torch.Tensor, norm: RMSNorm | None, gated: bool,
              residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What a 16-bit layer applies itself: the handed-over residual add, RMSNorm or
    SiLU-and-multiply. -> (the matmul's input, x + residual or None)."""
    if residual is not None:
        x = residual = x + residual
    if norm is not None:
        x = norm(x)
    return silu_and_mul(x) if gated else x, residual


def select_gemm_ops(n: int, k: int, w_bits: int, device: torch.device, block_bits: torch.Tensor | None = None,
                    dtype: torch.dtype | None = None):
    """The Triton kernels where they can implement the shape on this device, else `FloatOps`; with
    the layer's block map and output dtype, also the FP8 path for large M where it runs.

    A refusal is not an error: FloatOps computes the same function (slower)."""
    if device.type == "cuda":
        try:
            from cometserve.kernels import gemm_fp8, gemm_w4ax, quant_act
        except ImportError:
            return FloatOps
        ok, _reason = gemm_w4ax.can_implement(n, padded_k(k), w_bits, device)
        if ok:
            act_ok, _reason = quant_act.can_implement(k, device)
            fp8_ok = block_bits is not None and gemm_fp8.can_implement(n, padded_k(k), w_bits, dtype, device)[0]
            return _KernelOps(gemm_w4ax, quant_act.quant_act if act_ok else ref.quant_act,
                              (gemm_fp8, gemm_fp8.plan(block_bits)) if fp8_ok else None, act_ok)
    return FloatOps


class FloatOps:
    """Where no kernel runs (CPU, or a shape the kernels refuse): the reference's act-quant, and the
    W4Ax product as ONE float32 matmul of scaled codes. sum_b (a_b * a_scale_b) . (w_b * w_scale_b)^T
    is ref.w4ax_gemm's sum of exact per-block integer products times their scales, up to float32
    rounding (another summation order; tested against it). ref.w4ax_gemm's batched per-block products
    write an [nb, M, N] buffer per call: SmolLM2 W4AxKV4 MMLU took 0.82 s/question with it, 0.54 here
    (one CPU thread; the 16-bit model 0.26)."""

    quant_act = staticmethod(ref.quant_act)

    @staticmethod
    def prepare_weights(qweight: torch.Tensor, w_scales: torch.Tensor) -> tuple[torch.Tensor, None]:
        """-> float32 [N, K_pad] codes times their group's scale (w_scales [N, G], G = nb or 1)."""
        w = ref.weight_codes(qweight).float()
        n, k_pad = w.shape
        groups = w_scales.shape[1]
        return (w.view(n, groups, k_pad // groups) * w_scales.float()[:, :, None]).view(n, k_pad), None

    @staticmethod
    def w4ax_gemm(a_codes: torch.Tensor, a_scales: torch.Tensor, w_scaled: torch.Tensor, _unused,
                  bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
        """a_codes int8 [M, K_pad], a_scales float32 [M, nb], w_scaled from prepare_weights -> [M, N]."""
        m, k_pad = a_codes.shape
        a = (a_codes.float().view(m, a_scales.shape[1], -1) * a_scales[:, :, None]).view(m, k_pad)
        return nn.functional.linear(a, w_scaled, None if bias is None else bias.float()).to(out_dtype)


class _KernelOps:
    """The kernels chosen once for a layer, behind the reference's three-function interface:
    Triton act-quant and W4Ax GEMM, and from gemm_fp8.MIN_M rows the cuBLAS FP8 path where `fp8`
    (the gemm_fp8 module and the layer's plan) is given; there the fused act-quant kernel
    (`fused_fp8`) writes the FP8 operand itself (its rows padded to 16: callers keep the first M)."""

    def __init__(self, gemm, quant_act, fp8=None, fused_fp8: bool = False) -> None:
        self.prepare_weights = gemm.prepare_weights
        self._quant_act = quant_act
        self._gemm = gemm.w4ax_gemm
        self._fp8 = fp8
        self._fused_fp8 = fused_fp8 and fp8 is not None

    def quant_act(self, x, *args, **kwargs):
        if self._fused_fp8 and x.shape[0] >= self._fp8[0].MIN_M:
            kwargs["fp8"] = self._fp8[1]
        return self._quant_act(x, *args, **kwargs)

    def w4ax_gemm(self, a_codes, a_scales, qweight, w_scales, bias, out_dtype) -> torch.Tensor:
        if self._fp8 is not None and a_codes.shape[0] >= self._fp8[0].MIN_M:
            module, plan = self._fp8
            return module.w4ax_gemm(a_codes, a_scales, qweight, w_scales, bias, out_dtype, plan)
        return self._gemm(a_codes, a_scales, qweight, w_scales, bias, out_dtype)


@torch.no_grad()
def tune_gemms(model: nn.Module, max_m: int) -> int:
    """Run every distinct W4Ax layer shape once per M bucket the Triton kernel serves (up to
    `max_m` rows), so its per-bucket tuning happens here rather than as a 1-2 s stall in the
    first served step of a new batch size. Returns the number of (shape, M) pairs run."""
    seen, done = set(), 0
    dtype = next(model.parameters()).dtype
    for module in model.modules():
        if not isinstance(module, QuantLinear) or not isinstance(module._ops, _KernelOps):
            continue
        key = (module.out_features, module.in_features, module.w_bits)
        if key in seen:
            continue
        seen.add(key)
        fp8_from = module._ops._fp8[0].MIN_M if module._ops._fp8 is not None else None
        dev = module._qweight.device
        for m in (1, 16, 32, 64, 128, 256, 512, 1023, 2048, 4096):
            if m > max_m or (fp8_from is not None and m >= fp8_from):
                break
            x = torch.randn(m, module.in_features, device=dev, dtype=dtype)
            module(x)
            done += 1
    return done
