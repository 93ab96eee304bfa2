"""A real uvicorn server on loopback, in a thread of the test process, serving a tiny random Llama
quantized to FMPQ W4AxKV4 with the real SmolLM2 tokenizer and chat template (vocabulary 49152):
the whole serving path (HTTP, SSE, async engine, INT4 KV) at CPU speed."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
import torch

from cometserve.engine.async_engine import AsyncEngine
from cometserve.engine.engine import EngineConfig
from cometserve.server.run import make_server
from tests.tiny_models import tiny_with_smollm2_tokenizer

MODEL = "tiny-w4axkv4"
MAX_MODEL_LEN = 512  # tiny_models' max_position_embeddings


@pytest.fixture(scope="module", autouse=True)
def _server_tests_one_thread(one_thread):
    """Every server test module runs with one torch thread (tests/conftest.py)."""


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    return quantized_tiny(tmp_path_factory)


def quantized_tiny(tmp_path_factory, **shape):
    """A tiny random Llama (shape overrides) with the SmolLM2 tokenizer, quantized to fmpq_w4axkv4."""
    from cometserve.quant.quantize import quantize

    src = tiny_with_smollm2_tokenizer(tmp_path_factory.mktemp("tiny") / "llama", **shape)
    tokens = torch.randint(0, 49152, (2, 64), generator=torch.Generator().manual_seed(1))
    return quantize(src, tmp_path_factory.mktemp("q") / MODEL, scheme="fmpq_w4axkv4", calib_tokens=tokens,
                    device="cpu")


class LiveServer:
    """`with LiveServer(path) as s:` serves on 127.0.0.1 at a free port until the block ends."""

    def __init__(self, path, api_key: str | None = None, max_queue: int = 256, tool_call_parser: str | None = None,
                 chat_template: str | None = None, allowed_origins: list[str] | None = None, **engine_kw) -> None:
        cfg = EngineConfig(**{"max_num_seqs": 64, "num_pages": 64, "use_cuda_graphs": False, **engine_kw})
        self.engine = AsyncEngine.from_checkpoint(path, cfg, device="cpu", max_queue=max_queue)
        self.server = make_server(self.engine, MODEL, api_key=api_key, log_level="warning",
                                  tool_call_parser=tool_call_parser, chat_template=chat_template,
                                  allowed_origins=allowed_origins)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        wait_until(lambda: self.server.started, 30, "server start")
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
        assert not self.thread.is_alive(), "server thread did not stop"

    def client(self, api_key: str = "none", cls=openai.OpenAI):
        return cls(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=120)

    def assert_idle_and_free(self, timeout: float = 10.0) -> None:
        """Every request gone from the engine and every KV block, slot and generator released."""
        eng = self.engine.engine

        def idle() -> bool:
            return not eng.scheduler.requests and not eng.has_unfinished() and not self.engine._streams

        wait_until(idle, timeout, "engine idle")
        kv = eng.scheduler.kv
        assert kv.num_free_blocks == kv.num_blocks, f"{kv.num_blocks - kv.num_free_blocks} KV blocks leaked"
        assert len(eng.storage.slots) == 0, "sequence slots leaked"
        assert not eng.runner.generators and not eng.runner.counts, "sampler state leaked"
        assert not eng._tracked, "engine still tracks requests"


@contextlib.contextmanager
def serve_process(args: list[str], log_path: Path, timeout: float = 120):
    """`cometserve serve ARGS` in its own process on a free loopback port, up (/health 200) when the
    block starts; yields (process, url); killed at the end if still running."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "cometserve.cli", "serve", *args, "--port", str(port), "--log-level", "warning"]
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT) as proc:
        try:
            def healthy() -> bool:
                assert proc.poll() is None, f"server exited early: {log_path.read_text()}"
                try:
                    return httpx.get(f"{url}/health").status_code == 200
                except httpx.TransportError:
                    return False

            wait_until(healthy, timeout, "cometserve serve to come up")
            yield proc, url
        finally:
            if proc.poll() is None:
                proc.kill()


def wait_until(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(scope="session")
def server(tiny_checkpoint):
    with LiveServer(tiny_checkpoint) as s:
        yield s
