"""QuantScheme: what the bits mean. The one definition the offline quantizer, the checkpoint and
every kernel agree on.

Numerics (the contract `kernels/ref.py` implements and every GPU kernel must reproduce):

- Weights: symmetric signed integers, `w = code * w_scale`, per output channel (`w_group_size = 0`)
  or per group of 128 input channels aligned with the activation blocks. Scales are float16.
- Activations (FMPQ, COMET section 3): the layer input is permuted so outlier channels sit together,
  split along K into blocks of `a_block_size` channels; each (token, block) has a float32 scale
  `absmax / qmax` and is rounded to the INT4 grid (qmax 7) or the INT8 grid (qmax 127) as the
  layer's block map says. With `a_rotation = "hadamard"` every INT4 block is first multiplied by the
  orthonormal 128x128 Sylvester-Hadamard matrix (and the weight's matching K columns by the same
  matrix offline, so the product is unchanged): the rotation spreads the remaining within-block
  outliers over the block, which the INT4 grid needs far more than the INT8 grid does (measured on
  SmolLM2, 11% INT8 blocks: perplexity +40% -> +23% over 16-bit). The codes always travel in int8 containers
  (HARDWARE.md: on Hopper the 4-bit grid is a statement about numerics, the container an
  engineering choice).
- KV cache: asymmetric INT4, channel-wise: one (scale, zero) per (head, channel) for each group of
  `kv_group_size` consecutive tokens. The newest, not yet full group stays 16-bit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

FORMAT_VERSION = 1
BLOCK_SIZE = 128  # COMET's activation block: a multiple of the tensor-core K granularity

A_MODES = ("none", "fmpq", "int8", "int4")


@dataclass(frozen=True)
class QuantScheme:
    """A quantization recipe. `a_mode` says how the activation block map is chosen:

    - "none": 16-bit activations (weight-only quantization or no quantization at all)
    - "fmpq": outlier channels permuted together, their blocks INT8, the rest INT4 (COMET)
    - "int8": every block INT8, no permutation (the QServe-like W4A8 setting)
    - "int4": every block INT4, no permutation (plain W4A4)
    """

    name: str = "fmpq_w4axkv4"
    w_bits: int = 4  # 4, 8 or 16 (16 = keep the 16-bit weights)
    w_group_size: int = BLOCK_SIZE  # 0 = one scale per output channel
    a_mode: str = "fmpq"
    a_block_size: int = BLOCK_SIZE
    outlier_threshold: float = 3.0  # a channel is an outlier if absmax > this x median absmax
    a_rotation: str = "hadamard"  # "hadamard": INT4 blocks are rotated by a 128x128 Hadamard matrix
    kv_bits: int = 4  # 4 or 16
    kv_group_size: int = 64  # tokens that share one (scale, zero) per channel
    weight_rounding: str = "gptq"  # "gptq" (error-compensating, Hessian-weighted) or "rtn" (round to nearest)

    def __post_init__(self) -> None:
        if self.w_bits not in (4, 8, 16):
            raise ValueError(f"QuantScheme.w_bits must be 4, 8 or 16, got {self.w_bits}")
        if self.w_group_size not in (0, self.a_block_size):
            raise ValueError(
                f"QuantScheme.w_group_size must be 0 (per channel) or a_block_size "
                f"({self.a_block_size}), got {self.w_group_size}"
            )
        if self.a_mode not in A_MODES:
            raise ValueError(f"QuantScheme.a_mode must be one of {A_MODES}, got {self.a_mode!r}")
        if self.a_block_size != BLOCK_SIZE:
            raise ValueError(f"QuantScheme.a_block_size must be {BLOCK_SIZE}, got {self.a_block_size}")
        if self.a_mode != "none" and self.w_bits == 16:
            raise ValueError("QuantScheme: quantized activations need quantized weights (w_bits 4 or 8)")
        if self.kv_bits not in (4, 16):
            raise ValueError(f"QuantScheme.kv_bits must be 4 or 16, got {self.kv_bits}")
        if self.kv_group_size <= 0 or self.kv_group_size & (self.kv_group_size - 1):
            raise ValueError(f"QuantScheme.kv_group_size must be a power of two, got {self.kv_group_size}")
        if self.outlier_threshold <= 1.0:
            raise ValueError(f"QuantScheme.outlier_threshold must be > 1, got {self.outlier_threshold}")
        if self.a_rotation not in ("none", "hadamard"):
            raise ValueError(f"QuantScheme.a_rotation must be 'none' or 'hadamard', got {self.a_rotation!r}")
        if self.weight_rounding not in ("rtn", "gptq"):
            raise ValueError(f"QuantScheme.weight_rounding must be 'rtn' or 'gptq', got {self.weight_rounding!r}")

    @property
    def quantizes_weights(self) -> bool:
        return self.w_bits < 16

    @property
    def quantizes_activations(self) -> bool:
        return self.a_mode != "none"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> QuantScheme:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown field(s) {unknown}")
        # every field must be present: a default that changes later must not silently change
        # what an existing checkpoint means
        missing = sorted(known - set(d))
        if missing:
            raise ValueError(f"missing field(s) {missing}")
        return cls(**d)


PRESETS: dict[str, QuantScheme] = {
    s.name: s
    for s in (
        QuantScheme(name="fp16", w_bits=16, a_mode="none", kv_bits=16),
        QuantScheme(name="w8a8", w_bits=8, w_group_size=0, a_mode="int8", kv_bits=16, weight_rounding="rtn",
                    a_rotation="none"),
        QuantScheme(name="w4a16_rtn", a_mode="none", kv_bits=16, weight_rounding="rtn"),
        QuantScheme(name="w4a16_gptq", a_mode="none", kv_bits=16),
        QuantScheme(name="w4a4_rtn", a_mode="int4", kv_bits=16, weight_rounding="rtn", a_rotation="none"),
        QuantScheme(name="w4a8kv4", a_mode="int8", a_rotation="none"),
        QuantScheme(name="fmpq_w4ax", kv_bits=16),
        QuantScheme(name="fmpq_w4axkv4"),
    )
}


def get_scheme(name: str) -> QuantScheme:
    if name not in PRESETS:
        raise ValueError(f"unknown quantization scheme {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def num_blocks(in_features: int, block_size: int = BLOCK_SIZE) -> int:
    """Blocks along K; the last one may be partial (SmolLM2's hidden size 576 = 4.5 blocks)."""
    return -(-in_features // block_size)


def padded_k(in_features: int, block_size: int = BLOCK_SIZE) -> int:
    """K rounded up to whole blocks: packed weights and activation codes are zero padded to it."""
    return num_blocks(in_features, block_size) * block_size
