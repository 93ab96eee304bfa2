"""The OpenAI-compatible FastAPI app: /v1/models, /v1/completions, /v1/chat/completions, /health,
/metrics, and vLLM's /tokenize and /detokenize. It reaches the engine only through engine/async_engine.py.

Every failure a client can cause is answered in OpenAI's error shape with a 4xx status
(protocol.py says which); engine admission errors map to 429 (queue full), 503 (shutting down or
engine failed) and 400 (can never fit). A client that goes away, streaming or not, has its
sub-requests aborted, which frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from cometserve.engine.async_engine import (
    AsyncEngine,
    EngineDead,
    EngineOverloaded,
    EngineShutdown,
    RequestRejected,
    RequestStream,
)
from cometserve.sampling_params import SamplingParams, StructuredOutputsParams
from cometserve.server.metrics import LatencyTracker, Metrics
from cometserve.server.protocol import (
    MAX_CHOICES,
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    chat_messages,
    check_prompt,
    check_token_ids,
    check_unsupported,
    logit_bias,
    parse_body,
    sampling_params,
    structured_outputs,
    template_options,
)
from cometserve.server.responses import ChatFormat, Choice, CompletionFormat
from cometserve.server.tool_parsers import PARSERS
from cometserve.server.tools import template_tools, tool_plan

MAX_BODY_BYTES = 8 << 20


def build_app(engine: AsyncEngine, model_name: str, api_key: str | None = None,
              tool_call_parser: str | None = None, generation_config: str = "auto",
              chat_template: str | None = None, allowed_origins: list[str] | None = None) -> FastAPI:
    """The app; its lifespan starts the engine thread and shuts it down. `tool_call_parser`: a name
    of server/tool_parsers.PARSERS, for tool_choice "auto"; `generation_config`: "auto" takes the
    model's recommended sampling as the defaults of requests, "vllm" OpenAI's own defaults;
    `chat_template`: a Jinja template that replaces the tokenizer's; `allowed_origins`: web origins
    whose browser pages may call the API (CORS; none by default)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await engine.shutdown()

    app = FastAPI(title="cometserve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    if chat_template is not None:
        if engine.tokenizer is None:
            raise ValueError("a chat template needs the model's tokenizer (none was loaded)")
        engine.tokenizer.chat_template = chat_template
    routes = OpenAIRoutes(engine, model_name, api_key, tool_call_parser, generation_config)
    app.state.routes = routes
    if allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=allowed_origins, allow_methods=["*"], allow_headers=["*"])
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _server_error)
    app.add_api_route("/health", routes.health, methods=["GET"])
    app.add_api_route("/metrics", routes.metrics_text, methods=["GET"])
    app.add_api_route("/v1/models", routes.models, methods=["GET"])
    app.add_api_route("/v1/models/{model_id:path}", routes.model, methods=["GET"])
    app.add_api_route("/v1/completions", routes.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", routes.chat, methods=["POST"])
    app.add_api_route("/tokenize", routes.tokenize, methods=["POST"])
    app.add_api_route("/detokenize", routes.detokenize, methods=["POST"])
    return app


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = {404: f"no route {request.url.path}", 405: f"method {request.method} not allowed here"}
    return await _api_error(request, APIError(exc.status_code, message.get(exc.status_code, str(exc.detail))))


async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    return await _api_error(request, APIError(500, f"internal error: {type(exc).__name__}: {exc}"))


class OpenAIRoutes:
    def __init__(self, engine: AsyncEngine, model_name: str, api_key: str | None,
                 tool_call_parser: str | None = None, generation_config: str = "auto") -> None:
        if tool_call_parser is not None and tool_call_parser not in PARSERS:
            raise ValueError(f"unknown tool-call parser {tool_call_parser!r}: one of {sorted(PARSERS)}")
        if generation_config not in ("auto", "vllm"):
            raise ValueError(f"generation_config must be 'auto' or 'vllm', got {generation_config!r}")
        self.defaults = dict(engine.sampling_defaults) if generation_config == "auto" else {}
        try:
            SamplingParams(**self.defaults)
        except (TypeError, ValueError) as e:
            raise ValueError(f"the model's generation_config.json has a default the server cannot use: {e}") from None
        self.engine, self.model_name, self.api_key = engine, model_name, api_key
        self.tool_parser = PARSERS.get(tool_call_parser)
        self.tokenizer = engine.tokenizer
        self.metrics = Metrics()
        self.created = int(time.time())

    # ---- plain endpoints ----------------------------------------------------------------------

    async def health(self) -> JSONResponse:
        if self.engine.error is not None:
            return JSONResponse({"status": "error", "error": repr(self.engine.error)}, status_code=503)
        if self.engine.closing:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics_text(self) -> PlainTextResponse:
        return PlainTextResponse(self.metrics.render(self.engine.stats()),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "cometserve",
                "max_model_len": self.engine.max_model_len}

    async def models(self, request: Request) -> dict:
        self._auth(request)
        return {"object": "list", "data": [self._model_card()]}

    async def model(self, request: Request, model_id: str) -> dict:
        self._auth(request)
        self._check_model(model_id)
        return self._model_card()

    # ---- generation ---------------------------------------------------------------------------

    async def completions(self, request: Request):
        arrival = time.perf_counter()
        self._auth(request)
        req = parse_body(await _read_body(request), CompletionRequest)
        self._check_model(req.model)
        check_unsupported(req)
        prompts = await self._completion_prompts(req)
        echo = None
        if req.echo:  # the prompt's own text where it came as text, else its tokens decoded
            texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
            if not isinstance(texts[0], str):
                texts = [self.tokenizer.decode(ids) if self.tokenizer is not None else "" for ids in prompts]
            echo = list(zip(prompts, texts))
        fmt = CompletionFormat(self.model_name, self.tokenizer, req.logprobs is not None, req.n, req.logprobs or 0,
                               echo)
        return await self._generate(request, req, prompts, req.max_tokens, fmt, arrival, "prompt",
                                    structured_outputs(req))

    async def chat(self, request: Request):
        arrival = time.perf_counter()
        self._auth(request)
        req = parse_body(await _read_body(request), ChatRequest)
        self._check_model(req.model)
        check_unsupported(req)
        structured = structured_outputs(req)
        plan = tool_plan(req, structured, self.tool_parser)
        ids = await self._chat_ids(req, req.add_generation_prompt)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        fmt = ChatFormat(self.model_name, self.tokenizer, req.logprobs, req.n, req.top_logprobs or 0, tools=plan)
        return await self._generate(request, req, [ids], max_tokens, fmt, arrival, "messages",
                                    plan.structured if plan else structured)

    async def _chat_ids(self, req: ChatRequest | TokenizeRequest, add_generation_prompt: bool) -> list[int]:
        """The token ids the chat template makes of the request's messages."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, f"model '{self.model_name}' has no chat template: use /v1/completions")
        try:
            extra = {"tools": template_tools(req), **template_options(req)} if isinstance(req, ChatRequest) else {}
            text = await asyncio.to_thread(self.tokenizer.apply_chat_template, chat_messages(req), **extra,
                                           tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as e:  # noqa: BLE001 - jinja raises what the template chose (role order, ...)
            raise APIError(400, f"the chat template rejected the messages: {e}", "messages") from None
        return (await asyncio.to_thread(self.tokenizer, text, add_special_tokens=False))["input_ids"]

    # ---- tokenizer endpoints (vLLM's) -----------------------------------------------------------

    async def tokenize(self, request: Request) -> dict:
        """A prompt's token ids (as /v1/completions reads a text prompt), or the messages' (as
        /v1/chat/completions reads them)."""
        self._auth(request)
        req = parse_body(await _read_body(request), TokenizeRequest)
        if req.model is not None:
            self._check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give either 'prompt' or 'messages'", "prompt")
        if req.messages is not None:
            ids = await self._chat_ids(req, req.add_generation_prompt)
        elif self.tokenizer is None:
            raise APIError(400, f"model '{self.model_name}' has no tokenizer", "prompt")
        else:
            ids = (await asyncio.to_thread(self.tokenizer, req.prompt,
                                           add_special_tokens=req.add_special_tokens))["input_ids"]
        return {"count": len(ids), "max_model_len": self.engine.max_model_len, "tokens": ids}

    async def detokenize(self, request: Request) -> dict:
        self._auth(request)
        req = parse_body(await _read_body(request), DetokenizeRequest)
        if req.model is not None:
            self._check_model(req.model)
        if self.tokenizer is None:
            raise APIError(400, f"model '{self.model_name}' has no tokenizer", "tokens")
        bad = [t for t in req.tokens if not 0 <= t < self.engine.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {self.engine.vocab_size})",
                           "tokens")
        return {"prompt": await asyncio.to_thread(self.tokenizer.decode, req.tokens)}

    async def _completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        p = req.prompt
        if not p:
            raise APIError(400, "the prompt is empty", "prompt")
        if isinstance(p, list) and isinstance(p[0], int):
            return [p]
        if isinstance(p, list) and isinstance(p[0], list):
            return p
        texts = [p] if isinstance(p, str) else p
        if self.tokenizer is None:
            raise APIError(400, f"model '{self.model_name}' has no tokenizer: send the prompt as token ids",
                           "prompt")
        if len(texts) * req.n > MAX_CHOICES:
            raise APIError(400, f"at most {MAX_CHOICES} prompts times n per request", "prompt")
        return (await asyncio.to_thread(self.tokenizer, texts))["input_ids"]

    async def _generate(self, request: Request, req, prompts: list[list[int]], max_tokens: int | None,
                        fmt: CompletionFormat, arrival: float, param: str,
                        structured: StructuredOutputsParams | None):
        if len(prompts) * req.n > MAX_CHOICES:
            raise APIError(400, f"at most {MAX_CHOICES} prompts times n per request", param)
        if req.truncate_prompt_tokens is not None:  # vLLM's: the last N tokens of each prompt
            prompts = [ids[-req.truncate_prompt_tokens:] for ids in prompts]
        check_token_ids(req.allowed_token_ids, self.engine.vocab_size, "allowed_token_ids")
        for ids in prompts:
            check_prompt(ids, self.engine.vocab_size, self.engine.max_model_len, max_tokens, param)
        subs = [ids for ids in prompts for _ in range(req.n)]
        limit = self.engine.max_model_len
        bias = logit_bias(req, self.engine.vocab_size)
        prompt_k = fmt.top if fmt.echo is not None and fmt.want_logprobs else None
        params = [sampling_params(req, limit - len(ids) if max_tokens is None else max_tokens, i % req.n,
                                  fmt.want_logprobs, fmt.top, bias, prompt_k, structured, self.defaults)
                  for i, ids in enumerate(subs)]
        stream = await self._submit(subs, params)
        tracker = self.metrics.tracker(len(subs), arrival)
        num_prompt = sum(len(ids) for ids in prompts)
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            return StreamingResponse(_sse(stream, fmt, tracker, len(subs), num_prompt, usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        choices = await _collect(request, stream, tracker, len(subs))
        return JSONResponse(fmt.response(choices, num_prompt))

    async def _submit(self, prompts: list[list[int]], params) -> RequestStream:
        try:
            return await self.engine.add(prompts, params)
        except EngineOverloaded as e:
            raise APIError(429, str(e), code="server_overloaded", type="rate_limit_error") from None
        except (EngineShutdown, EngineDead) as e:
            raise APIError(503, str(e), code="unavailable") from None
        except RequestRejected as e:
            raise APIError(400, str(e)) from None

    # ---- checks -------------------------------------------------------------------------------

    def _auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(404, f"the model '{model}' does not exist; this server serves '{self.model_name}'",
                           "model", "model_not_found")


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise APIError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise APIError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise APIError(400, "the client disconnected while sending the body") from None
    return b"".join(chunks)


def _accumulate(c: Choice, delta) -> None:
    c.token_ids += delta.new_token_ids
    c.text += delta.text_delta
    c.logprobs += delta.logprobs or []
    c.top_logprobs += delta.top_logprobs or []
    c.prompt_logprobs = delta.prompt_logprobs or c.prompt_logprobs
    c.finish_reason = delta.finish_reason
    c.cached_tokens = max(c.cached_tokens, delta.num_cached_tokens)


def _aborted_error() -> EngineShutdown:
    return EngineShutdown("the request was aborted by the server (shutting down)")


async def _collect(request: Request, stream: RequestStream, tracker: LatencyTracker, n: int) -> list[Choice]:
    """A non-streamed request's choices; the request is aborted if the client goes away first."""
    choices = [Choice() for _ in range(n)]

    async def consume() -> None:
        async for i, d in stream:
            if d.finish_reason == "abort":
                raise _aborted_error()
            tracker.observe(i, len(d.new_token_ids))
            _accumulate(choices[i], d)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, gone = asyncio.ensure_future(consume()), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            raise APIError(400, "the client disconnected")  # never delivered; ends the handler
        work.result()
    except (EngineShutdown, EngineDead) as e:
        raise APIError(503, str(e), code="unavailable") from None
    finally:
        work.cancel()
        gone.cancel()
        stream.abort()
    return choices


def _event(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _sse(stream: RequestStream, fmt: CompletionFormat, tracker: LatencyTracker, n: int,
               num_prompt: int, include_usage: bool):
    """Server-sent events: one chunk per delta, an optional usage chunk, then [DONE]. Starlette
    cancels this generator when the client disconnects; `finally` aborts what is left."""
    choices = [Choice() for _ in range(n)]
    try:
        for chunk in fmt.first_chunks(n):
            yield _event(chunk)
        async for i, d in stream:
            if d.finish_reason == "abort":
                raise _aborted_error()
            tracker.observe(i, len(d.new_token_ids))
            yield _event(fmt.chunk(i, choices[i], d))
            _accumulate(choices[i], d)
        if include_usage:
            yield _event(fmt.usage_chunk(choices, num_prompt))
        yield "data: [DONE]\n\n"
    except (EngineShutdown, EngineDead) as e:
        yield _event(APIError(503, str(e), code="unavailable").body())
    finally:
        stream.abort()
