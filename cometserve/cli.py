"""cometserve quantize | generate | eval | demo | bench | serve."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEMO_PROMPTS = (
    "What is the capital of France?",
    "Write one sentence about the sea.",
)


def _sampling(args):
    from cometserve.sampling_params import SamplingParams, StructuredOutputsParams

    shapes = {"json": args.json_schema, "regex": args.regex, "choice": args.choice,
              "json_object": args.json_object or None}
    given = {k: v for k, v in shapes.items() if v is not None}
    if given and args.json_schema is not None and Path(args.json_schema).is_file():
        given["json"] = Path(args.json_schema).read_text()
    return SamplingParams(
        n=args.n, max_tokens=args.max_tokens, min_tokens=args.min_tokens, temperature=args.temperature,
        top_p=args.top_p, top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        seed=args.seed, stop=tuple(args.stop or ()),
        structured_outputs=StructuredOutputsParams(**given) if given else None,
    )


def _text_or_file(value: str | None) -> str | None:
    """A flag's value, or the text of the file it names."""
    if value is not None and "{" not in value and Path(value).is_file():
        return Path(value).read_text()
    return value


def cmd_quantize(args) -> None:
    from cometserve.quant.calib_data import CalibSpec
    from cometserve.quant.quantize import quantize

    calib = CalibSpec(args.text, args.samples, args.seq_len, args.seed) if args.text else None
    if calib is None and (args.samples, args.seq_len, args.seed) != (32, 512, 0):
        from cometserve import assets

        calib = CalibSpec(assets.default_calibration_text()[0], args.samples, args.seq_len, args.seed)
    out = quantize(args.model, args.out_dir, scheme=args.scheme, calib=calib, device=args.device)
    print(f"wrote {out}")


def cmd_generate(args) -> None:
    from cometserve.engine.llm import LLM

    llm = LLM(args.model, device=args.device)
    chat = args.chat if args.chat is not None else bool(getattr(llm.tokenizer, "chat_template", None))
    for out in llm.generate(args.prompt, _sampling(args), chat=chat, use_tqdm=False):
        print(f"> {out.prompt}")
        for c in out.outputs:
            print(f"{c.text}\n[{len(c.token_ids)} tokens, {out.seconds:.2f} s, {c.finish_reason}]")


def cmd_eval(args) -> None:
    import torch

    from cometserve import assets
    from cometserve.engine.llm import LLM
    from cometserve.evaluate import mmlu_accuracy, mmlu_questions, perplexity

    llm = LLM(args.model, device=args.device)
    if args.mmlu is not None:
        rows = mmlu_questions(args.mmlu or None)
        acc = mmlu_accuracy(llm.model, llm.scheme, llm.tokenizer, rows)
        print(f"mmlu {100 * acc:.1f}%  ({len(rows)} questions, zero-shot, scheme {llm.scheme.name})")
    if args.ppl or args.mmlu is None:
        source, text = (args.text, assets.load_corpus(args.text)) if args.text else assets.default_eval_text()
        ids = torch.tensor(llm.tokenizer(text, add_special_tokens=False)["input_ids"])
        ppl = perplexity(llm.model, llm.scheme, ids, ctx=args.ctx, max_windows=args.max_windows)
        print(f"perplexity {ppl:.3f}  ({source}, ctx {args.ctx}, scheme {llm.scheme.name})")


def demo_checkpoint(device: str | None = None, requantize: bool = False) -> Path:
    """The shipped SmolLM2-135M quantized to W4AxKV4 with FMPQ (default calibration), made once and
    cached beside its 16-bit copy."""
    from cometserve import assets, checkpoint
    from cometserve.config import cache_dir
    from cometserve.quant.quantize import quantize
    from cometserve.scheme import get_scheme

    src = assets.smollm2_dir()
    ckpt = cache_dir() / "smollm2-135m-instruct-fmpq_w4axkv4"
    try:  # a checkpoint made by another version of the scheme is made again
        current = checkpoint.load_quant_config(ckpt)[1] == get_scheme("fmpq_w4axkv4")
    except checkpoint.CheckpointError:
        current = False
    if not current or requantize:
        t0 = time.perf_counter()
        quantize(src, ckpt, scheme="fmpq_w4axkv4", device=device)
        print(f"quantized {src.name} with FMPQ in {time.perf_counter() - t0:.1f} s -> {ckpt}")
    return ckpt


def cmd_demo(args) -> None:
    """Quantize the shipped SmolLM2-135M with FMPQ (once, cached), then generate from the 16-bit
    and the W4AxKV4 model side by side."""
    from cometserve import assets
    from cometserve.engine.llm import LLM

    src = assets.smollm2_dir()
    ckpt = demo_checkpoint(args.device, args.requantize)
    params = _sampling(args)
    prompts = args.prompt or list(DEMO_PROMPTS)
    results = {}
    for label, path in (("16-bit", src), ("W4AxKV4", ckpt)):
        llm = LLM(path, device=args.device)
        results[label] = llm.generate(prompts, params, chat=True, use_tqdm=False)
        print(f"{label}: {path} on {llm.device}")
    for i, prompt in enumerate(prompts):
        print(f"\n> {prompt}")
        for label, outs in results.items():
            c = outs[i].outputs[0]
            rate = len(c.token_ids) / outs[i].seconds
            print(f"[{label:8s} {outs[i].seconds:6.2f} s, {rate:5.1f} tok/s] {c.text.strip()}")
    if llm.device.type == "cpu":
        print("\n(On CPU the W4AxKV4 model runs the pure-PyTorch reference of each kernel: activation "
              "quantization, per-block integer products and the INT4 KV cache in plain tensor ops, slower "
              "than 16-bit. The speed-up comes from the GPU kernels on models of real size; see the "
              "README's results.)")


def cmd_bench(args) -> None:
    """Run benchmarks/e2e/throughput.py of this source checkout with the remaining arguments."""
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "e2e" / "throughput.py"
    if not script.is_file():
        raise FileNotFoundError(f"{script}: the benchmark ships with the source checkout only")
    spec = importlib.util.spec_from_file_location("cometserve_bench_throughput", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rc = module.main(args.bench_args)
    if rc:
        raise RuntimeError(f"benchmark exited with status {rc}")


def cmd_serve(args) -> None:
    """The OpenAI-compatible HTTP server (cometserve/server/) on a checkpoint or random weights."""
    from cometserve.engine.async_engine import AsyncEngine
    from cometserve.engine.engine import EngineConfig
    from cometserve.server.run import serve

    if (args.model is None) == (args.random_weights is None):
        raise ValueError("give a CHECKPOINT or --random-weights NAME (one of them)")
    if args.tensor_parallel < 1:
        raise ValueError(f"--tensor-parallel must be >= 1, got {args.tensor_parallel}")
    cfg = EngineConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                       max_model_len=args.max_model_len, num_pages=args.num_pages,
                       memory_fraction=args.memory_fraction, use_cuda_graphs=not args.no_cuda_graphs,
                       enable_prefix_caching=not args.no_prefix_caching, lm_head=args.lm_head,
                       max_piecewise_tokens=EngineConfig.max_piecewise_tokens if args.max_piecewise_tokens is None
                       else args.max_piecewise_tokens)
    name = args.served_model_name or (Path(args.model).name if args.model is not None
                                      else f"{Path(args.random_weights).stem}-{args.mode}")
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (the model's call format)")
    workers = None
    if args.tensor_parallel > 1:  # one process per rank; this one is rank 0 and schedules
        from cometserve.distributed.engine import ModelSpec
        from cometserve.distributed.launch import launch_engine

        tokenizer = None
        if args.model is not None:
            from transformers import AutoTokenizer

            from cometserve.model.loader import resolve_model_path

            tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_path(args.model)))
        spec = ModelSpec(path=args.model, random_weights=args.random_weights, mode=args.mode)
        llm_engine, workers = launch_engine(spec, args.tensor_parallel, cfg, tokenizer, args.device)
        defaults = {}
        if args.model is not None:
            from cometserve.engine.llm import generation_defaults

            llm_engine.eos_token_id, defaults = generation_defaults(resolve_model_path(args.model), tokenizer)
        engine = AsyncEngine(llm_engine, args.max_queue)
        engine.sampling_defaults = defaults
    elif args.model is not None:
        engine = AsyncEngine.from_checkpoint(args.model, cfg, args.device, args.max_queue)
    else:
        engine = AsyncEngine.from_random_weights(args.random_weights, args.mode, cfg, args.device, args.max_queue)
    try:
        serve(engine, name, host=args.host, port=args.port, api_key=args.api_key,
              shutdown_timeout=args.shutdown_timeout, log_level=args.log_level,
              tool_call_parser=args.tool_call_parser, generation_config=args.generation_config,
              chat_template=_text_or_file(args.chat_template), allowed_origins=args.allowed_origins)
    finally:
        if workers is not None:
            workers.close()


def _add_serve_parser(sub) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    s.add_argument("model", nargs="?", help="model directory, GGUF file or cometserve checkpoint")
    s.add_argument("--random-weights", help="serve random weights of this shape instead (llama-3-8b, ...; "
                   "no tokenizer: prompts are token ids)")
    s.add_argument("--mode", default="w4axkv4", choices=("bf16", "w4a8kv4", "w4axkv4"),
                   help="precision of --random-weights")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    s.add_argument("--served-model-name", default=None, help="the model id clients send (default: dir name)")
    s.add_argument("--tool-call-parser", default=None, choices=("hermes", "llama3_json"),
                   help="the model's own tool-call format, for tool_choice 'auto' (hermes: Qwen2; llama3_json: "
                   "Llama 3.1/3.2)")
    s.add_argument("--allowed-origins", action="append", default=None, metavar="ORIGIN",
                   help="a web origin (or *) whose pages may call the API from a browser (CORS; repeatable)")
    s.add_argument("--chat-template", default=None,
                   help="a Jinja chat template (a file, or the template itself) replacing the model's")
    s.add_argument("--generation-config", default="auto", choices=("auto", "vllm"),
                   help="auto: the model's generation_config.json sampling values are the defaults of requests "
                   "that leave them unset (vLLM's default); vllm: OpenAI's defaults")
    s.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="accepted for vLLM's command lines: 'auto' is on whenever --tool-call-parser is given")
    s.add_argument("--max-num-seqs", type=int, default=256, help="largest running batch")
    s.add_argument("--max-num-batched-tokens", type=int, default=8192, help="token budget of one step")
    s.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")
    s.add_argument("--max-queue", type=int, default=256, help="waiting sequences before 429 answers")
    s.add_argument("--num-pages", type=int, default=None,
                   help="KV cache pages (default: from free GPU memory; on CPU, one full context)")
    s.add_argument("--memory-fraction", "--gpu-memory-utilization", type=float, default=0.9,
                   help="share of GPU memory for weights, activations and the KV cache (vLLM's name too)")
    s.add_argument("--lm-head", choices=("16bit", "int8"), default="16bit",
                   help="int8: weight-only INT8 LM head (half its bytes; faster decode at small batches)")
    s.add_argument("--no-cuda-graphs", action="store_true")
    s.add_argument("--max-piecewise-tokens", type=int, default=None,
                   help="steps up to this many tokens (prefill, mixed) replay piecewise CUDA graphs (default "
                        "2048; 0: those steps run eagerly)")
    s.add_argument("--no-prefix-caching", action="store_true",
                   help="do not reuse the K/V of prompts' shared leading pages across requests")
    s.add_argument("--tensor-parallel", "--tensor-parallel-size", "-tp", type=int, default=1,
                   help="GPUs (ranks) to split the model over (vLLM's names too)")
    s.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish on SIGINT/SIGTERM")
    s.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    s.add_argument("--device", default=None, help="cpu or cuda (default: the GPU if there is one)")
    s.set_defaults(func=cmd_serve)


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--min-tokens", type=int, default=0, help="no EOS, stop token or stop string before this many")
    p.add_argument("-n", type=int, default=1, help="completions per prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--json-schema", help="structured output: a JSON schema (a file, or its JSON text)")
    p.add_argument("--regex", help="structured output: the completion fully matches this regex")
    p.add_argument("--choice", action="append", help="structured output: one of these strings (repeatable)")
    p.add_argument("--json-object", action="store_true", help="structured output: any JSON object")
    p.add_argument("--device", default=None, help="cpu or cuda (default: the GPU if there is one)")


def build_parser() -> argparse.ArgumentParser:
    from cometserve.scheme import PRESETS

    parser = argparse.ArgumentParser(prog="cometserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="quantize a HF directory or GGUF file into a checkpoint")
    q.add_argument("model")
    q.add_argument("out_dir")
    q.add_argument("--scheme", default="fmpq_w4axkv4", choices=[n for n in PRESETS if n != "fp16"])
    q.add_argument("--text", help="calibration text: austen[:novel], pydoc, or a file path")
    q.add_argument("--samples", type=int, default=32)
    q.add_argument("--seq-len", type=int, default=512)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--device", default=None)
    q.set_defaults(func=cmd_quantize)
    g = sub.add_parser("generate", help="generate from a model or checkpoint")
    g.add_argument("model")
    g.add_argument("--prompt", action="append", required=True)
    chat = g.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_true", default=None, help="apply the chat template")
    chat.add_argument("--no-chat", dest="chat", action="store_false")
    _add_sampling_args(g)
    g.set_defaults(func=cmd_generate)
    e = sub.add_parser("eval", help="perplexity on held-out text, MMLU")
    e.add_argument("model")
    e.add_argument("--ppl", action="store_true", help="sliding-window perplexity (the default)")
    e.add_argument("--mmlu", type=int, nargs="?", const=0, default=None, metavar="N",
                   help="zero-shot MMLU on N seeded questions (all without N)")
    e.add_argument("--text", help="austen:<novel>, pydoc, or a file path (default: held-out Austen)")
    e.add_argument("--ctx", type=int, default=512)
    e.add_argument("--max-windows", type=int, default=None)
    e.add_argument("--device", default=None)
    e.set_defaults(func=cmd_eval)
    d = sub.add_parser("demo", help="quantize the shipped SmolLM2-135M and compare it with 16-bit")
    d.add_argument("--prompt", action="append")
    d.add_argument("--requantize", action="store_true")
    _add_sampling_args(d)
    d.set_defaults(func=cmd_demo)
    # prefix_chars="+": every "--flag" after `bench` goes to the benchmark script untouched
    b = sub.add_parser("bench", help="end-to-end throughput (benchmarks/e2e/throughput.py; its --help)",
                       prefix_chars="+", add_help=False)
    b.add_argument("bench_args", nargs=argparse.REMAINDER)
    b.set_defaults(func=cmd_bench)
    _add_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"cometserve {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
