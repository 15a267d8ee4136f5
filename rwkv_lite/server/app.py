"""The HTTP side of `rwkv-lite serve`: the Starlette application and its routes (Server), API-key checks, request
bodies read within their size limit, the engine thread's lifetime, and the relay of the engine's Steps to a whole
response or a server-sent event stream; serve() runs it under uvicorn with a graceful shutdown.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import threading
import time
import uuid

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from ..engine import Engine, QueueFullError, Step
from ..errors import RwkvLiteError
from ..prefix_cache import PrefixCache
from .metrics import prometheus_text
from .parse import ApiError, RequestParser
from .reply import Reply, error_body, openai_finish_reason, sse

MAX_BODY_BYTES = 8 << 20          # a request body larger than this is refused (413) before it is parsed
RETRY_AFTER_SECONDS = 1


class Server:
    """The HTTP side: owns the engine thread; `app` is the ASGI application."""

    def __init__(self, model, *, model_name: str, max_batch: int = 8, max_queue: int = 64, cache_mb: float = 512,
                 api_key: str | None = None, max_prompt_tokens: int = 8192, max_tokens: int = 2048,
                 prefill_chunk: int = 128):
        if model.tokenizer is None:
            raise RwkvLiteError(f"{model.path}: the model has no tokenizer, so it cannot serve text")
        self.model = model
        self.model_name = model_name
        self.api_key = api_key
        self.parser = RequestParser(model.tokenizer, vocab_size=model.config["vocab_size"], model_name=model_name,
                                    max_prompt_tokens=max_prompt_tokens, max_tokens=max_tokens)
        self.created = int(time.time())
        self.cache = PrefixCache(int(cache_mb * 2**20)) if cache_mb > 0 else None
        self.engine = Engine(model, max_batch=max_batch, max_queue=max_queue, prefill_chunk=prefill_chunk,
                             cache=self.cache)
        self.app = Starlette(routes=[
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", self.get_model, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
        ], exception_handlers={404: self._not_found, 405: self._not_allowed}, lifespan=self._lifespan)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        self.engine.start()
        try:
            yield
        finally:
            # uvicorn has stopped accepting connections and waited for the open ones (or its graceful timeout):
            # cancel whatever still runs and stop the engine thread
            await asyncio.get_running_loop().run_in_executor(None, self.engine.shutdown, 5.0)

    # -- plumbing ------------------------------------------------------------------------------------------------
    async def _not_found(self, request, exc):
        return ApiError(404, f"no route {request.method} {request.url.path}", code="not_found").response()

    async def _not_allowed(self, request, exc):
        return ApiError(405, f"method {request.method} is not allowed on {request.url.path}").response()

    def _authorize(self, request: HttpRequest) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                           kind="authentication_error", code="invalid_api_key")

    async def _json_body(self, request: HttpRequest) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes")
        return self.parser.body(body)

    # -- simple routes -------------------------------------------------------------------------------------------
    async def health(self, request):
        return JSONResponse({"status": "ok"})

    async def list_models(self, request):
        try:
            self._authorize(request)
        except ApiError as e:
            return e.response()
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def get_model(self, request):
        try:
            self._authorize(request)
            if request.path_params["model_id"] != self.model_name:
                raise ApiError(404, f"the model '{request.path_params['model_id']}' does not exist",
                               code="model_not_found")
        except ApiError as e:
            return e.response()
        return JSONResponse(self._model_card())

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "rwkv-lite"}

    async def metrics(self, request):
        try:
            self._authorize(request)
        except ApiError as e:
            return e.response()
        return PlainTextResponse(prometheus_text(self.engine, self.cache),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    # -- generation ----------------------------------------------------------------------------------------------
    async def completions(self, request):
        try:
            self._authorize(request)
            doc = await self._json_body(request)
            jobs = await asyncio.to_thread(self.parser.completion_jobs, doc)      # tokenizing is work
        except ApiError as e:
            return e.response()
        return await self._run(request, doc, jobs, chat=False)

    async def chat_completions(self, request):
        try:
            self._authorize(request)
            doc = await self._json_body(request)
            jobs = await asyncio.to_thread(self.parser.chat_jobs, doc)
        except ApiError as e:
            return e.response()
        return await self._run(request, doc, jobs, chat=True)

    async def _run(self, http: HttpRequest, doc: dict, jobs: list[dict], chat: bool):
        stream = bool(doc.get("stream"))
        options = doc.get("stream_options") or {}
        if not isinstance(options, dict):
            return ApiError(400, "'stream_options' must be an object", param="stream_options").response()
        include_usage = bool(options.get("include_usage"))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        requests = []
        try:
            for index, job in enumerate(jobs):
                def relay(step: Step, index=index):
                    try:
                        loop.call_soon_threadsafe(queue.put_nowait, (index, step))
                    except RuntimeError:        # the event loop is gone (shutting down)
                        pass
                # OpenAI's penalties count every generated token (no exemption for digits and spaces)
                requests.append(self.engine.submit(job.pop("prompt"), on_step=relay, penalty_exempt_text=None, **job))
        except QueueFullError as e:
            for r in requests:
                r.cancel()
            return ApiError(503, f"server busy: {e}", kind="server_error", code="queue_full",
                            headers={"Retry-After": str(RETRY_AFTER_SECONDS)}).response()
        except RwkvLiteError as e:
            for r in requests:
                r.cancel()
            return ApiError(400, str(e)).response()
        prefix = "chatcmpl-" if chat else "cmpl-"
        reply = Reply(f"{prefix}{uuid.uuid4().hex}", int(time.time()), self.model_name, chat, requests,
                       self.model.tokenizer)
        if stream:
            return StreamingResponse(self._stream(reply, queue, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            pending = len(requests)
            while pending:
                try:
                    index, step = await asyncio.wait_for(queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        raise asyncio.CancelledError from None
                    continue
                reply.add(index, step)
                if step.finish_reason is not None:
                    pending -= 1
        except BaseException:
            for r in requests:
                r.cancel()
            raise
        failed = [r for r in requests if r.finish_reason in ("error", "cancelled")]
        if failed:
            r = failed[0]
            status = 500 if r.finish_reason == "error" else 503
            return ApiError(status, r.error or "the request was cancelled (server shutting down)",
                            kind="server_error").response()
        return JSONResponse(reply.whole())

    async def _stream(self, reply: Reply, queue: asyncio.Queue, include_usage: bool):
        pending = len(reply.requests)
        try:
            if reply.chat:
                yield sse(reply.chunk(0, {"role": "assistant", "content": ""}, None, None, include_usage))
            while pending:
                index, step = await queue.get()
                delta = reply.add(index, step)
                if step.finish_reason in ("error", "cancelled"):
                    message = step.error or "the request was cancelled (server shutting down)"
                    yield sse(error_body(message, "server_error"))
                    pending -= 1
                    continue
                if step.finish_reason is not None:
                    pending -= 1
                if delta is None:
                    continue
                text, logprobs = delta
                if step.finish_reason is not None:
                    if text:
                        yield sse(reply.text_chunk(index, text, logprobs, None, include_usage))
                    end = openai_finish_reason(step.finish_reason)
                    yield sse(reply.text_chunk(index, "", None, end, include_usage))
                elif text or logprobs is not None:
                    yield sse(reply.text_chunk(index, text, logprobs, None, include_usage))
            if include_usage:
                yield sse(reply.usage_chunk())
            yield "data: [DONE]\n\n"
        finally:                              # the client went away (or we finished): free the slots
            for r in reply.requests:
                r.cancel()


def serve(model, *, host: str, port: int, model_name: str, log_level: str = "info", shutdown_timeout: float = 30,
          ready=None, **options) -> None:
    """Run the server until SIGINT/SIGTERM. Then: no new connections; running requests may finish for up to
    `shutdown_timeout` seconds; the rest are cancelled (a stream gets an error event and [DONE], and ends as a
    well-formed response); the process exits."""
    import uvicorn
    server = Server(model, model_name=model_name, **options)

    class GracefulServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if not self.should_exit:                 # first signal: drain the engine in the background
                threading.Thread(target=server.engine.shutdown, args=(shutdown_timeout,), daemon=True).start()
            super().handle_exit(sig, frame)

    # uvicorn's own deadline comes after ours, so it never has to cut a stream off mid-body
    config = uvicorn.Config(server.app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=shutdown_timeout + 10, access_log=log_level == "debug")
    uv = GracefulServer(config)
    if ready is not None:
        ready(server)
    uv.run()

