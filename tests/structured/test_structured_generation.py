"""Structured outputs through the engine: a random-weights model (whose free output is noise) with the
shipped SmolLM2 tokenizer writes only what the grammar allows; the batched engine (sync and async
scheduling) equals the one-sequence reference; bad specs are refused with the reason."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest

from cometserve.engine.engine import EngineConfig
from cometserve.engine.llm import LLM
from cometserve.sampling_params import SamplingParams, StructuredOutputsParams
from cometserve.structured.grammar import GrammarCompiler, unpack
from cometserve.structured.vocab import token_bytes
from tests.engine.test_engine import count_preemptions
from tests.tiny_models import tiny_with_smollm2_tokenizer

PERSON = {  # what pydantic writes for a small model: $defs, enum, optional field, bounded integer
    "$defs": {"Pet": {"properties": {"kind": {"enum": ["cat", "dog"], "type": "string"},
                                     "legs": {"type": "integer", "minimum": 0, "maximum": 4}},
                      "required": ["kind", "legs"], "title": "Pet", "type": "object"}},
    "properties": {"name": {"type": "string", "maxLength": 6}, "adult": {"type": "boolean"},
                   "pet": {"anyOf": [{"$ref": "#/$defs/Pet"}, {"type": "null"}]}},
    "required": ["name", "adult", "pet"], "title": "Person", "type": "object",
}
SPECS = {
    "choice": StructuredOutputsParams(choice=["yes", "no", "maybe not"]),
    "regex": StructuredOutputsParams(regex=r"[0-9]{3}-[A-Z]{2}(x|yz)?"),
    "json": StructuredOutputsParams(json=PERSON),
}


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    src = tiny_with_smollm2_tokenizer(tmp_path_factory.mktemp("tiny") / "llama")
    return LLM(src, device="cpu", engine_config=EngineConfig(max_num_seqs=8, num_pages=64, use_cuda_graphs=False))


def _full_match(spec: StructuredOutputsParams, text: str) -> bool:
    return re.fullmatch(spec.regex_pattern(), text, re.ASCII) is not None


@pytest.mark.parametrize("name", SPECS)
def test_engine_equals_reference_and_output_follows_the_grammar(llm, name):
    spec = SPECS[name]
    prompts = ["Hello", "The answer is", "Write JSON:"]
    for params in (SamplingParams(max_tokens=80, structured_outputs=spec),
                   SamplingParams(max_tokens=80, temperature=1.0, seed=3, structured_outputs=spec)):
        got = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
        want = [o.outputs[0] for o in llm.generate_reference(prompts, params)]
        assert [g.token_ids for g in got] == [w.token_ids for w in want]
        for g in got:
            assert g.finish_reason == "stop" and _full_match(spec, g.text), g.text
    if name == "json":
        assert all(isinstance(json.loads(g.text)["adult"], bool) for g in got)


def test_without_the_grammar_the_model_writes_noise(llm):
    """The control: the same prompts unconstrained match none of the grammars."""
    for o in llm.generate(["Hello", "The answer is"], SamplingParams(max_tokens=12), use_tqdm=False):
        assert not any(_full_match(s, o.outputs[0].text) for s in SPECS.values())


def test_json_object_and_limits(llm):
    out = llm.generate(["{"], SamplingParams(max_tokens=64, temperature=1.0, seed=0,
                                             structured_outputs=StructuredOutputsParams(json_object=True)),
                       use_tqdm=False)[0].outputs[0]
    assert out.text.startswith("{")
    if out.finish_reason == "stop":
        assert isinstance(json.loads(out.text), dict)
    else:  # cut by max_tokens: still a prefix the grammar allows
        assert out.finish_reason == "length" and len(out.token_ids) == 64


def test_async_scheduling_structured_beside_free_requests(llm):
    """With async scheduling (forced on CPU) steps still launch ahead of structured requests: their
    rows are sampled once the step in flight has decided their masks (ModelRunner.finish). Outputs
    equal the synchronous engine's, for grammars that end the request (choice) and those that run to
    max_tokens, sampled and greedy."""
    prompts = ["Hello", "Once upon", "The answer is", "Pick"]
    params = [SamplingParams(max_tokens=20), SamplingParams(max_tokens=40, structured_outputs=SPECS["json"]),
              SamplingParams(max_tokens=20, temperature=1.0, seed=5),
              SamplingParams(max_tokens=20, temperature=1.0, seed=2, structured_outputs=SPECS["choice"])]
    sync = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
    async_llm = LLM.__new__(LLM)
    async_llm.__dict__.update(llm.__dict__)
    async_llm.engine_config = EngineConfig(max_num_seqs=8, num_pages=64, use_cuda_graphs=False, async_scheduling=True)
    async_llm._engine = None
    engine = async_llm.engine([[1]], [params[0]])
    assert engine.async_scheduling
    finished, finish = [], engine.runner.finish
    engine.runner.finish = lambda pending, allowed: finished.append(len(allowed)) or finish(pending, allowed)
    got = [o.outputs[0] for o in async_llm.generate(prompts, params, use_tqdm=False)]
    assert [(g.token_ids, g.finish_reason) for g in got] == [(s.token_ids, s.finish_reason) for s in sync]
    assert len(finished) >= 30 and max(finished) == 2  # ahead of both structured requests at once


def test_token_bytes_spell_the_text(llm):
    tok = llm.tokenizer
    spelled = token_bytes(tok, 49152 + 8)
    text = 'Hi {"a": [1, 2.5e-3], "b": "wörld 中文 😀"}\n\tend'
    assert b"".join(spelled[i] for i in tok.encode(text)) == text.encode()
    assert spelled[tok.eos_token_id] is None and spelled[49152] is None  # special, and past the vocabulary


def test_masks_equal_running_each_token(llm):
    tok = llm.tokenizer
    matcher = GrammarCompiler(tok, 49152).matcher(SPECS["json"], stop_ids=(tok.eos_token_id,))
    dfa, spelled = matcher.grammar.dfa, matcher.grammar.index.tokens
    for piece in ['{"name": "', 'Al', '", "adult": ', "true", ', "pet": ', "null", "}"]:
        want = np.array([b is not None and dfa.run(b, matcher.state) != 0 for b in spelled])
        want[tok.eos_token_id] = bool(dfa.accepting[matcher.state])
        assert (unpack(matcher.allowed(), 49152) == want).all(), piece
        for t in tok.encode(piece):
            matcher.accept(t)
    assert matcher.is_complete and matcher.is_terminated


@pytest.mark.parametrize("kw, msg", [
    ({"regex": "(ab"}, "missing )"),
    ({"regex": "a", "choice": ["a"]}, "exactly one"),
    ({}, "exactly one"),
    ({"json": "{not json"}, "not valid JSON"),
    ({"json": {"type": "number", "multipleOf": 3}}, "multipleOf"),
    ({"choice": []}, "non-empty"),
])
def test_bad_specs_are_refused_with_the_reason(kw, msg):
    with pytest.raises(ValueError, match=re.escape(msg)):
        StructuredOutputsParams(**kw)


def test_engine_without_tokenizer_refuses_structured_requests(llm):
    from cometserve.engine.engine import LLMEngine

    engine = LLMEngine(llm.model, llm.scheme, EngineConfig(num_pages=8, use_cuda_graphs=False))
    with pytest.raises(ValueError, match="tokenizer"):
        engine.add_request("a", [1, 2], SamplingParams(structured_outputs=SPECS["choice"]))
    assert not engine.has_unfinished()


def test_allowed_token_ids_and_special_tokens_in_text(llm):
    """vLLM's allowed_token_ids: every token from the list (EOS only if listed), engine = reference,
    greedy and seeded; skip_special_tokens=False keeps the chat markers in the text."""
    tok = llm.tokenizer
    ids = tuple(tok.encode(" yes no maybe")) + (1, 2)  # 1, 2: <|im_start|>, <|im_end|> (2 is also EOS)
    for extra in ({}, {"temperature": 1.0, "seed": 7}):
        params = SamplingParams(max_tokens=12, allowed_token_ids=ids, **extra)
        got = [o.outputs[0] for o in llm.generate(["Hello", "Pick one:"], params, use_tqdm=False)]
        want = [o.outputs[0] for o in llm.generate_reference(["Hello", "Pick one:"], params)]
        assert [g.token_ids for g in got] == [w.token_ids for w in want]
        assert all(t in ids for g in got for t in g.token_ids)
    marks = SamplingParams(max_tokens=6, allowed_token_ids=(1,), ignore_eos=True)
    shown = llm.generate("Hi", dataclasses.replace(marks, skip_special_tokens=False), use_tqdm=False)[0].outputs[0]
    hidden = llm.generate("Hi", marks, use_tqdm=False)[0].outputs[0]
    assert shown.text == "<|im_start|>" * 6 and hidden.text == "" and shown.token_ids == hidden.token_ids == [1] * 6
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate("Hi", SamplingParams(allowed_token_ids=(49152 + 5,)), use_tqdm=False)
    with pytest.raises(ValueError, match="give one of them"):
        SamplingParams(allowed_token_ids=(1,), structured_outputs=SPECS["choice"])
    with pytest.raises(ValueError, match="only stop tokens"):  # the first prompt, accepted, does not run
        llm.generate(["Hello", "Hi"], [SamplingParams(), SamplingParams(allowed_token_ids=(2,), min_tokens=1)],
                     use_tqdm=False)
    assert not llm._engine.has_unfinished() and not llm._engine.scheduler.requests


def test_structured_requests_survive_preemption(llm):
    """A cache too small for the batch: requests are preempted and recomputed; their grammars keep
    their place (the outputs so far stay), so every output still equals the one-sequence reference."""
    small = LLM.__new__(LLM)
    small.__dict__.update(llm.__dict__)
    small.engine_config = EngineConfig(max_num_seqs=8, num_pages=5, page_size=16, use_cuda_graphs=False)
    small._engine = None
    prompts = ["Hello", "Once upon a time", "The answer is", "Write JSON:"]
    params = [SamplingParams(max_tokens=40, structured_outputs=SPECS["json"]),
              SamplingParams(max_tokens=40, temperature=1.0, seed=9, structured_outputs=SPECS["json"]),
              SamplingParams(max_tokens=40, structured_outputs=SPECS["regex"]), SamplingParams(max_tokens=40)]
    engine = small.engine([[1]] * 4, params)
    preempted = count_preemptions(engine)
    got = [o.outputs[0] for o in small.generate(prompts, params, use_tqdm=False)]
    assert small._engine is engine and preempted, "the cache is sized to force preemption"
    want = [o.outputs[0] for o in llm.generate_reference(prompts, params)]
    assert [(g.token_ids, g.finish_reason) for g in got] == [(w.token_ids, w.finish_reason) for w in want]


def test_a_cached_grammar_never_waits_for_another_compilation(llm, monkeypatch):
    """While one thread compiles a grammar (held here at a gate), another gets its cached one."""
    import threading

    from cometserve.structured import grammar as grammar_module

    compiler = GrammarCompiler(llm.tokenizer, 49152)
    cached = compiler.grammar(SPECS["choice"])
    gate, started, real = threading.Event(), threading.Event(), grammar_module.compile_regex

    def held(pattern):
        started.set()
        gate.wait(30)
        return real(pattern)

    monkeypatch.setattr(grammar_module, "compile_regex", held)
    slow = threading.Thread(target=compiler.grammar, args=(SPECS["regex"],))
    slow.start()
    assert started.wait(30)
    got = []
    fast = threading.Thread(target=lambda: got.append(compiler.grammar(SPECS["choice"])))
    fast.start()
    fast.join(10)
    done = not fast.is_alive()
    gate.set()
    slow.join(30)
    assert done and got == [cached]


def test_generation_config_adds_eos_ids(tmp_path):
    """A generation_config.json's eos_token_id list (Llama 3 Instruct's <|end_of_text|>, <|eot_id|>):
    each ends a request as the tokenizer's EOS does (unless ignore_eos), in the engine and the reference."""
    src = tiny_with_smollm2_tokenizer(tmp_path / "m")
    cfg = EngineConfig(max_num_seqs=4, num_pages=16, use_cuda_graphs=False)
    free = LLM(src, device="cpu", engine_config=cfg).generate("Hello", SamplingParams(max_tokens=10, ignore_eos=True),
                                                               use_tqdm=False)[0].outputs[0].token_ids
    stop = free[3]
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, stop], "temperature": 0.7}))
    llm = LLM(src, device="cpu", engine_config=cfg)
    assert llm.eos_token_ids == (2, stop) and llm.get_default_sampling_params().temperature == 0.7
    params = SamplingParams(max_tokens=10)
    got = llm.generate("Hello", params, use_tqdm=False)[0].outputs[0]
    assert got.token_ids == free[: free.index(stop)] and got.finish_reason == "stop"
    assert llm.generate_reference("Hello", params)[0].outputs[0].token_ids == got.token_ids
    past = llm.generate("Hello", SamplingParams(max_tokens=10, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert past.token_ids == free
    (src / "generation_config.json").write_text("{oops")
    with pytest.raises(ValueError, match="generation_config.json is not valid JSON"):
        LLM(src, device="cpu")
