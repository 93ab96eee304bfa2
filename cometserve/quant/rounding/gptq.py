"""GPTQ (Frantar et al., 2023): round one input column at a time and push its rounding error onto the
columns not yet rounded, weighted by the inverse Hessian of the layer's calibration inputs, so the
layer's output error (not the weight error) is minimized. Run in FMPQ's permuted channel order, with
groups of 128 that line up with the activation blocks, and a clipping search for each group's scale.
"""

from __future__ import annotations

import torch

from cometserve.kernels.ref import round_half_away
from cometserve.quant.primitives import MIN_W_SCALE, weight_qmax

CLIP_GRID = torch.linspace(1.0, 0.6, 9)  # candidate fractions of the absmax for each scale


def search_scales(w: torch.Tensor, bits: int, h_diag: torch.Tensor) -> torch.Tensor:
    """Per-row float16 scale for w [N, G] minimizing the Hessian-diagonal-weighted rounding error
    over clipped absmax values (a few large weights need not stretch the grid of the whole row)."""
    qmax = weight_qmax(bits)
    absmax = w.abs().amax(1)
    best_err = torch.full_like(absmax, float("inf"))
    best = (absmax / qmax).clamp(min=MIN_W_SCALE).half()
    for clip in CLIP_GRID.tolist():
        s = (absmax * clip / qmax).clamp(min=MIN_W_SCALE).half()
        sf = s.float()[:, None]
        q = torch.clamp(round_half_away(w / sf), -qmax - 1, qmax) * sf
        err = ((q - w) ** 2 * h_diag[None, :]).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s, best)
    return best


@torch.no_grad()
def round_weight(
    w: torch.Tensor, bits: int, group_size: int, hessian: torch.Tensor, damp: float = 0.01, block: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K], hessian [K, K] (both in the permuted, padded channel order) -> (int8 codes [N, K],
    float16 scales [N, G]). Codes are round-half-away of w'/scale like RTN, on error-updated w'."""
    n, k = w.shape
    w = w.clone().float()
    h = hessian.clone().double()
    dead = torch.diag(h) == 0  # padding and channels that never fired: nothing to protect
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(k, dtype=h.dtype, device=h.device)
    # H^-1 from its Cholesky factor by one triangular solve (torch.cholesky_inverse is ~25x slower
    # on CPU), then the upper Cholesky factor of H^-1 that GPTQ's column updates use
    chol_inv = torch.linalg.solve_triangular(torch.linalg.cholesky(h), torch.eye(k, dtype=h.dtype, device=h.device), upper=False)
    hinv = torch.linalg.cholesky(chol_inv.T @ chol_inv, upper=True).float()
    h_diag = torch.diag(h).float()
    qmax = weight_qmax(bits)
    per_channel = group_size == 0
    scales = search_scales(w, bits, h_diag)[:, None] if per_channel else torch.empty(n, k // group_size, dtype=torch.float16, device=w.device)
    codes = torch.empty(n, k, dtype=torch.int8, device=w.device)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(n, i2 - i1, device=w.device), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if not per_channel and col % group_size == 0:
                g = col // group_size
                scales[:, g] = search_scales(w1[:, i : i + group_size], bits, h_diag[col : col + group_size])
            s = scales[:, 0 if per_channel else col // group_size].float()
            q = round_half_away(w1[:, i] / s).clamp(-qmax - 1, qmax)
            codes[:, col] = q.to(torch.int8)
            e = (w1[:, i] - q * s) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return codes, scales

