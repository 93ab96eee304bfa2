"""`cometserve serve --tensor-parallel 2` on CPU (gloo): two ranks behind one HTTP server answer a
greedy completion exactly as the one-process offline API does."""

from __future__ import annotations

import openai

from cometserve.sampling_params import SamplingParams
from tests.server.conftest import quantized_tiny, serve_process

TP_SHAPES = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2}
PROMPT = "The sea was calm and"


def test_serve_tensor_parallel_2_answers_like_one_process(tmp_path_factory, tmp_path):
    from cometserve.engine.llm import LLM

    ckpt = quantized_tiny(tmp_path_factory, **TP_SHAPES)
    want = LLM(ckpt, device="cpu").generate([PROMPT], SamplingParams(max_tokens=8, ignore_eos=True),
                                            use_tqdm=False)[0].outputs[0]
    args = [str(ckpt), "--device", "cpu", "--num-pages", "64", "--tensor-parallel", "2", "--served-model-name", "tp"]
    with serve_process(args, tmp_path / "serve.log") as (_proc, url):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        got = client.completions.create(model="tp", prompt=PROMPT, max_tokens=8, temperature=0,
                                        extra_body={"ignore_eos": True}, logprobs=0)
    tokens = got.choices[0].logprobs.tokens
    assert len(tokens) == len(want.token_ids) == 8
    assert got.choices[0].text == want.text
