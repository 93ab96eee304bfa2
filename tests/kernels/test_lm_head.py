"""The weight-only INT8 LM head kernel (kernels/lm_head.py) against `ref.w8a16_logits`, and the
per-row quantization. The CPU suite runs the kernel under TRITON_INTERPRET=1 (in a subprocess, as
every kernel test here); there the dot runs in float32 (the interpreter's 16-bit dot is wrong), so
it checks the indexing, masks and scales; the GPU cases check the 16-bit tensor-core dot."""

from __future__ import annotations

import pytest
import torch

from cometserve.kernels import ref
from tests.kernels import interp
from tests.kernels.interp import report_cases

# (name, M, K, N, dtype): M picks the tile config (<= 16, <= 64, above); K and N not multiples of
# the tiles (576 = SmolLM2's hidden size; an odd vocabulary)
CPU_CASES = [
    ("m1_k576_n321_bf16", 1, 576, 321, torch.bfloat16),
    ("m3_k256_n640_fp16", 3, 256, 640, torch.float16),
    ("m20_k384_n130_bf16", 20, 384, 130, torch.bfloat16),
    ("m70_k128_n200_bf16", 70, 128, 200, torch.bfloat16),
]


def check(m, k, n, dtype, device="cpu"):
    from cometserve.kernels import lm_head

    g = torch.Generator().manual_seed(m * 1000 + k)
    codes, scales = ref.quantize_rows_int8(torch.randn(n, k, generator=g) * 0.05)
    x = torch.randn(m, k, generator=g).to(dtype)
    codes, scales, x = codes.to(device), scales.to(device), x.to(device)
    got = lm_head.w8a16_logits(x, codes, scales)
    want = ref.w8a16_logits(x, codes, scales)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    # float32 sums of K products in another order, relative to the largest logit (measured on the
    # H200: 1.1e-5 at K = 8192, fp16; the interpreter's float32 dot: < 1e-6)
    torch.testing.assert_close(got, want, rtol=0, atol=4e-5 * float(want.abs().max()) + 1e-6)


def _main():
    report_cases(CPU_CASES, check)


@pytest.fixture(scope="module")
def interpreted_report():
    return interp.interpreted_report(__file__)


@pytest.mark.parametrize("name", [c[0] for c in CPU_CASES])
def test_interpreted_matches_reference(interpreted_report, name):
    assert interpreted_report[name] == "ok", interpreted_report[name]


def test_quantize_rows_int8():
    w = torch.randn(5, 300) * torch.tensor([0.01, 1.0, 30.0, 0.0, 2.0])[:, None]
    codes, scales = ref.quantize_rows_int8(w)
    assert codes.dtype == torch.int8 and scales.dtype == torch.float32 and scales.shape == (5,)
    assert scales[3] == 0 and not codes[3].any()  # an all-zero row
    assert (codes.abs().amax(dim=1)[[0, 1, 2, 4]] == 127).all()  # each row's largest |w| -> 127
    err = (codes.float() * scales[:, None] - w).abs()
    assert (err <= scales[:, None] / 2 * (1 + 1e-6) + 1e-12).all()  # round to nearest


def test_rejects_bad_operands():
    from cometserve.kernels import lm_head

    codes, scales = ref.quantize_rows_int8(torch.randn(8, 64))
    with pytest.raises(ValueError, match="codes int8"):
        lm_head.w8a16_logits(torch.randn(2, 32, dtype=torch.bfloat16), codes, scales)
    with pytest.raises(ValueError, match="codes int8"):
        lm_head.w8a16_logits(torch.randn(2, 64, dtype=torch.bfloat16), codes.float(), scales)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("m", [1, 2, 16, 17, 64, 65, 257])
@pytest.mark.parametrize("k, n", [(4096, 32000), (576, 49152), (8192, 1000)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_matches_reference(m, k, n, dtype):
    check(m, k, n, dtype, "cuda")


if __name__ == "__main__":
    _main()
