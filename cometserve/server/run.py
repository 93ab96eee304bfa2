"""Run the app under uvicorn, with a shutdown that drains.

On SIGINT or SIGTERM the engine refuses new requests at once (503), uvicorn stops accepting
connections and waits up to `shutdown_timeout` seconds for the requests in flight to finish; what
is still running then is cancelled (its sub-requests aborted), the engine thread is stopped, and
the process exits (uvicorn re-raises the signal, so the exit status says which one).
"""

from __future__ import annotations

import logging

import uvicorn

from cometserve.engine.async_engine import AsyncEngine
from cometserve.server.app import build_app


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: AsyncEngine) -> None:
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig, frame) -> None:
        self.engine.begin_shutdown()
        super().handle_exit(sig, frame)


def make_server(engine: AsyncEngine, model_name: str, host: str = "127.0.0.1", port: int = 8000,
                api_key: str | None = None, shutdown_timeout: float = 30.0,
                log_level: str = "info", tool_call_parser: str | None = None,
                generation_config: str = "auto", chat_template: str | None = None,
                allowed_origins: list[str] | None = None) -> uvicorn.Server:
    """A uvicorn server for the app; `.run()` blocks (`.run(sockets=[sock])` serves a bound socket)."""
    app = build_app(engine, model_name, api_key, tool_call_parser, generation_config, chat_template, allowed_origins)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=log_level == "debug",
                            timeout_graceful_shutdown=shutdown_timeout, lifespan="on")
    return _Server(config, engine)


def serve(engine: AsyncEngine, model_name: str, **kwargs) -> None:
    server = make_server(engine, model_name, **kwargs)
    logging.getLogger("uvicorn.error").info("serving model %r (kernels compiled and tuned in %.1f s)", model_name,
                                            engine.warm_up_s)
    server.run()
