"""`rwkv-lite serve`: an OpenAI-compatible HTTP server over the continuous-batching engine (docs/server.md).

Needs the `server` extra (Starlette + uvicorn). One engine thread owns the batch and does all the computing
(rwkv_lite/engine.py); the event loop only parses requests, hands them to the engine and relays its events.

Routes: GET /health, GET /metrics (Prometheus text), GET /v1/models, GET /v1/models/{id}, POST /v1/completions,
POST /v1/chat/completions. With an API key every route but /health needs `Authorization: Bearer KEY`.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import math
import threading
import time
import uuid

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from .chat_format import CHAT_REPLY_END, CHAT_STOP, ChatFormatError, chat_prompt_ids
from .engine import MAX_TOP_LOGPROBS, Engine, QueueFullError, Step
from .errors import RwkvLiteError
from .prefix_cache import PrefixCache
from .sampling import SamplingParams

MAX_BODY_BYTES = 8 << 20          # a request body larger than this is refused (413) before it is parsed
RETRY_AFTER_SECONDS = 1
# Request fields we know but do not implement: refused with 400 rather than silently ignored
UNSUPPORTED = ("suffix", "logit_bias", "tools", "tool_choice", "functions", "function_call", "response_format",
               "audio", "modalities", "prediction")


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.kind, self.param, self.code), status_code=self.status,
                            headers=self.headers)


def error_body(message: str, kind: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


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
        self.max_prompt_tokens = int(max_prompt_tokens)
        self.max_tokens = int(max_tokens)
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
        try:
            doc = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(doc, dict):
            raise ApiError(400, "the request body must be a JSON object")
        for name in UNSUPPORTED:
            if doc.get(name) not in (None, [], {}):
                raise ApiError(400, f"'{name}' is not supported by this server", param=name)
        model = doc.get("model")
        if model is not None and model != self.model_name:
            raise ApiError(404, f"the model '{model}' does not exist (this server serves '{self.model_name}')",
                           param="model", code="model_not_found")
        return doc

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
            prompts = await asyncio.to_thread(self._prompts, doc.get("prompt"))      # tokenizing is work
            if doc.get("echo"):
                raise ApiError(400, "'echo' is not supported by this server", param="echo")
            if doc.get("best_of") not in (None, 1):
                raise ApiError(400, "'best_of' other than 1 is not supported", param="best_of")
            logprobs = _optional_int(doc, "logprobs", 0, MAX_TOP_LOGPROBS)
            jobs = [dict(prompt=p, logprobs=logprobs, **self._generation_args(doc, default_max_tokens=16))
                    for p in prompts]
        except ApiError as e:
            return e.response()
        return await self._run(request, doc, jobs, chat=False)

    async def chat_completions(self, request):
        try:
            self._authorize(request)
            doc = await self._json_body(request)
            ids, points = await asyncio.to_thread(self._chat_prompt, doc.get("messages"))
            top = _optional_int(doc, "top_logprobs", 0, MAX_TOP_LOGPROBS)
            want = doc.get("logprobs")
            if want is not None and not isinstance(want, bool):
                raise ApiError(400, "'logprobs' must be true or false for chat completions", param="logprobs")
            if top is not None and not want:
                raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
            args = self._generation_args(doc, default_max_tokens=None)
            args["stop"] = (CHAT_STOP,) + args["stop"]
            jobs = [dict(prompt=ids, logprobs=(top or 0) if want else None, cache_points=points,
                         reply_suffix=CHAT_REPLY_END, **args)]
        except ApiError as e:
            return e.response()
        return await self._run(request, doc, jobs, chat=True)

    def _prompts(self, prompt) -> list[list[int]]:
        """The `prompt` field: a string, a list of strings, a list of token ids, or a list of such lists."""
        tok = self.model.tokenizer
        if isinstance(prompt, str):
            out = [tok.encode(prompt)]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            out = [tok.encode(p) for p in prompt]
        elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
            out = [list(prompt)]
        elif (isinstance(prompt, list) and prompt
              and all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in prompt)):
            out = [list(p) for p in prompt]
        else:
            raise ApiError(400, "'prompt' must be a string, a list of strings, or token ids", param="prompt")
        V = self.model.config["vocab_size"]
        for ids in out:
            if any(not 0 <= t < V for t in ids):
                raise ApiError(400, f"prompt token ids must lie in 0..{V - 1}", param="prompt")
            self._check_length(ids)
        return out

    def _chat_prompt(self, messages) -> tuple[list[int], list[int]]:
        """The World chat format prompt (rwkv_lite/chat_format.py) and the message boundaries (cache points)."""
        try:
            ids, points = chat_prompt_ids(self.model.tokenizer, messages)
        except ChatFormatError as e:
            raise ApiError(400, str(e), param="messages") from None
        self._check_length(ids)
        return ids, points

    def _check_length(self, ids) -> None:
        if len(ids) > self.max_prompt_tokens:
            raise ApiError(413, f"the prompt has {len(ids)} tokens, more than this server's limit of "
                                f"{self.max_prompt_tokens} (--max-prompt-tokens)", param="prompt",
                           code="context_length_exceeded")

    def _generation_args(self, doc: dict, default_max_tokens: int | None) -> dict:
        max_tokens = doc.get("max_completion_tokens", doc.get("max_tokens"))
        if max_tokens is None:
            max_tokens = default_max_tokens if default_max_tokens is not None else self.max_tokens
        if not _is_int(max_tokens) or max_tokens < 0:
            raise ApiError(400, f"'max_tokens' must be a whole number >= 0, got {max_tokens!r}", param="max_tokens")
        if max_tokens > self.max_tokens:
            raise ApiError(400, f"'max_tokens' {max_tokens} is over this server's limit of {self.max_tokens}",
                           param="max_tokens")
        if doc.get("n") not in (None, 1):
            raise ApiError(400, "'n' other than 1 is not supported (send several requests)", param="n")
        stop = doc.get("stop")
        stop = () if stop is None else (stop,) if isinstance(stop, str) else stop
        if (not isinstance(stop, (list, tuple)) or len(stop) > 16
                or any(not isinstance(s, str) or not s for s in stop)):
            raise ApiError(400, "'stop' must be a non-empty string or a list of up to 16 of them", param="stop")
        values = {}
        for name, low, high, default in (("temperature", 0.0, 2.0, 1.0), ("top_p", 0.0, 1.0, 1.0),
                                         ("min_p", 0.0, 1.0, 0.0), ("presence_penalty", -2.0, 2.0, 0.0),
                                         ("frequency_penalty", -2.0, 2.0, 0.0)):
            v = doc.get(name)
            if v is None:
                v = default
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not low <= v <= high:
                raise ApiError(400, f"'{name}' must be a number in [{low:g}, {high:g}], got {v!r}", param=name)
            values[name] = float(v)
        top_k = doc.get("top_k")
        if top_k is not None and (not _is_int(top_k) or top_k < -1):
            raise ApiError(400, f"'top_k' must be a whole number >= 0 (or -1: off), got {top_k!r}", param="top_k")
        seed = doc.get("seed")
        if seed is not None and not _is_int(seed):
            raise ApiError(400, f"'seed' must be an integer, got {seed!r}", param="seed")
        params = SamplingParams(top_k=max(0, top_k or 0), penalty_decay=1.0,       # OpenAI penalties: plain counts
                                seed=None if seed is None else seed % 2**63, **values)
        return {"max_tokens": int(max_tokens), "stop": tuple(stop), "params": params}

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
        reply = _Reply(f"{prefix}{uuid.uuid4().hex}", int(time.time()), self.model_name, chat, requests,
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

    async def _stream(self, reply: "_Reply", queue: asyncio.Queue, include_usage: bool):
        pending = len(reply.requests)
        try:
            if reply.chat:
                yield _sse(reply.chunk(0, {"role": "assistant", "content": ""}, None, None, include_usage))
            while pending:
                index, step = await queue.get()
                delta = reply.add(index, step)
                if step.finish_reason in ("error", "cancelled"):
                    message = step.error or "the request was cancelled (server shutting down)"
                    yield _sse(error_body(message, "server_error"))
                    pending -= 1
                    continue
                if step.finish_reason is not None:
                    pending -= 1
                if delta is None:
                    continue
                text, logprobs = delta
                if step.finish_reason is not None:
                    if text:
                        yield _sse(reply.text_chunk(index, text, logprobs, None, include_usage))
                    yield _sse(reply.text_chunk(index, "", None, _finish_reason(step.finish_reason), include_usage))
                elif text or logprobs is not None:
                    yield _sse(reply.text_chunk(index, text, logprobs, None, include_usage))
            if include_usage:
                yield _sse(reply.usage_chunk())
            yield "data: [DONE]\n\n"
        finally:                              # the client went away (or we finished): free the slots
            for r in reply.requests:
                r.cancel()


def _sse(doc) -> str:
    return f"data: {json.dumps(doc, ensure_ascii=False)}\n\n"


def _finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _optional_int(doc: dict, name: str, low: int, high: int) -> int | None:
    v = doc.get(name)
    if v is None:
        return None
    if not _is_int(v) or not low <= v <= high:
        raise ApiError(400, f"'{name}' must be a whole number in [{low}, {high}], got {v!r}", param=name)
    return v


class _Reply:
    """Accumulates one HTTP request's choices and renders OpenAI's objects (whole and streamed chunks)."""

    def __init__(self, rid: str, created: int, model: str, chat: bool, requests, tokenizer):
        self.id, self.created, self.model, self.chat = rid, created, model, chat
        self.requests = requests
        self.tokenizer = tokenizer
        self.texts = [""] * len(requests)
        self.finish = [None] * len(requests)
        self.logprobs = [[] for _ in requests]
        self.leading = [True] * len(requests)          # chat: the space the model writes after "Assistant:"

    def add(self, index: int, step: Step):
        """Record a step; returns (text to send, logprobs entry or None), or None if there is nothing to send."""
        text = step.text
        if self.chat and self.leading[index] and text:
            text = text.lstrip()
            if text:
                self.leading[index] = False
        self.texts[index] += text
        if step.finish_reason is not None:
            self.finish[index] = step.finish_reason
        entry = None
        if step.token is not None and step.logprob is not None:
            entry = self._logprob_entry(step)
            self.logprobs[index].append(entry)
        return text, entry

    def _token_text(self, token: int) -> str:
        return self.tokenizer.decode_bytes([token]).decode("utf-8", errors="replace")

    def _logprob_entry(self, step: Step) -> dict:
        if self.chat:
            return {"token": self._token_text(step.token), "logprob": step.logprob,
                    "bytes": list(self.tokenizer.decode_bytes([step.token])),
                    "top_logprobs": [{"token": self._token_text(t), "logprob": lp,
                                      "bytes": list(self.tokenizer.decode_bytes([t]))}
                                     for t, lp in step.top_logprobs or []]}
        return {"token": self._token_text(step.token), "logprob": step.logprob,
                "top": {self._token_text(t): lp for t, lp in step.top_logprobs or []}}

    def _completion_logprobs(self, entries: list[dict]) -> dict:
        offsets, pos = [], 0
        for e in entries:
            offsets.append(pos)
            pos += len(e["token"])
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [e["top"] for e in entries], "text_offset": offsets}

    def usage(self) -> dict:
        prompt = sum(r.usage.prompt_tokens for r in self.requests)
        completion = sum(r.usage.completion_tokens for r in self.requests)
        cached = sum(r.usage.cached_tokens for r in self.requests)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def whole(self) -> dict:
        choices = []
        for i, text in enumerate(self.texts):
            wants_logprobs = self.requests[i].logprobs is not None
            if self.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "logprobs": {"content": self.logprobs[i]} if wants_logprobs else None,
                                "finish_reason": _finish_reason(self.finish[i])})
            else:
                choices.append({"index": i, "text": text,
                                "logprobs": self._completion_logprobs(self.logprobs[i]) if wants_logprobs else None,
                                "finish_reason": _finish_reason(self.finish[i])})
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": self.usage()}

    def chunk(self, index, delta, logprobs, finish_reason, include_usage) -> dict:
        doc = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
               "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}
        if include_usage:
            doc["usage"] = None
        return doc

    def text_chunk(self, index, text, entry, finish_reason, include_usage) -> dict:
        if self.chat:
            delta = {"content": text} if text or finish_reason is None else {}
            logprobs = {"content": [entry]} if entry is not None else None
            return self.chunk(index, delta, logprobs, finish_reason, include_usage)
        doc = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
               "choices": [{"index": index, "text": text,
                            "logprobs": self._completion_logprobs([entry]) if entry is not None else None,
                            "finish_reason": finish_reason}]}
        if include_usage:
            doc["usage"] = None
        return doc

    def usage_chunk(self) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [], "usage": self.usage()}


def prometheus_text(engine: Engine, cache: PrefixCache | None) -> str:
    """The engine's counters in the Prometheus text exposition format."""
    m = engine.metrics
    lines = []

    def metric(name, kind, help_text, samples):
        lines.append(f"# HELP rwkv_lite_{name} {help_text}")
        lines.append(f"# TYPE rwkv_lite_{name} {kind}")
        for labels, value in samples:
            label = "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
            lines.append(f"rwkv_lite_{name}{label} {value}")

    metric("requests_total", "counter", "Requests accepted by the engine.", [({}, m.requests)])
    metric("requests_rejected_total", "counter", "Requests refused because the queue was full (HTTP 503).",
           [({}, m.rejected)])
    metric("requests_finished_total", "counter", "Finished requests by reason.",
           [({"reason": k}, v) for k, v in sorted(m.finished.items())] or [({"reason": "stop"}, 0)])
    metric("generated_tokens_total", "counter", "Tokens generated.", [({}, m.tokens)])
    metric("prompt_tokens_read_total", "counter", "Prompt tokens run through the model (cache hits excluded).",
           [({}, m.prompt_tokens_read)])
    metric("decode_steps_total", "counter", "Batched decode steps.", [({}, m.decode_steps)])
    metric("decode_rows_total", "counter", "Sequences advanced by decode steps (rows / steps = mean batch).",
           [({}, m.decode_rows)])
    metric("decode_seconds_total", "counter", "Time in batched decode steps.", [({}, round(m.decode_seconds, 6))])
    metric("prefill_seconds_total", "counter", "Time reading prompts.", [({}, round(m.prefill_seconds, 6))])
    metric("batch_occupancy", "gauge", "Requests in the running batch now.", [({}, engine.running)])
    metric("batch_capacity", "gauge", "Slots in the running batch (--max-batch).", [({}, engine.max_batch)])
    metric("queue_length", "gauge", "Requests waiting for a slot.", [({}, engine.queue_length)])
    metric("prefix_cache_hits_total", "counter", "Prompts that resumed from a cached prefix state.",
           [({}, m.cache_hits)])
    metric("prefix_cache_misses_total", "counter", "Prompts with no cached prefix.", [({}, m.cache_misses)])
    metric("prefix_cache_tokens_total", "counter", "Prompt tokens not re-read thanks to the cache.",
           [({}, m.cached_tokens)])
    metric("prefix_cache_bytes", "gauge", "Bytes held by the prefix cache.", [({}, cache.nbytes if cache else 0)])
    metric("prefix_cache_entries", "gauge", "States held by the prefix cache.", [({}, len(cache) if cache else 0)])
    lines.append("# HELP rwkv_lite_time_to_first_token_seconds Time from submission to the first token.")
    lines.append("# TYPE rwkv_lite_time_to_first_token_seconds histogram")
    for bound, count in m.ttft_buckets.items():
        le = "+Inf" if math.isinf(bound) else f"{bound:g}"
        lines.append(f'rwkv_lite_time_to_first_token_seconds_bucket{{le="{le}"}} {count}')
    lines.append(f"rwkv_lite_time_to_first_token_seconds_sum {m.ttft_sum:.6f}")
    lines.append(f"rwkv_lite_time_to_first_token_seconds_count {m.ttft_count}")
    return "\n".join(lines) + "\n"


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


__all__ = ["Server", "serve", "prometheus_text", "ApiError"]
