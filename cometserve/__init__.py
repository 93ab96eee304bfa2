"""cometserve: LLaMA-family serving with 4-bit weights, mixed 4/8-bit activations and a 4-bit KV cache
(COMET's FMPQ, ASPLOS'25), on Hopper GPUs and, through the reference path, on any CPU."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["LLM", "QuantScheme", "SamplingParams", "StructuredOutputsParams", "quantize"]


def __getattr__(name: str):
    # lazy: `import cometserve` must not pull in torch, transformers or the offline quantizer
    if name == "LLM":
        from cometserve.engine.llm import LLM

        return LLM
    if name in ("SamplingParams", "StructuredOutputsParams"):
        from cometserve import sampling_params

        return getattr(sampling_params, name)
    if name == "QuantScheme":
        from cometserve.scheme import QuantScheme

        return QuantScheme
    if name == "quantize":
        from cometserve.quant.quantize import quantize

        return quantize
    raise AttributeError(f"module 'cometserve' has no attribute {name!r}")
