"""Request bodies -> engine arguments: the OpenAI request fields of /v1/completions and /v1/chat/completions
validated against this server's model and limits (RequestParser), and ApiError, the HTTP error every bad request
becomes. Nothing here touches the network; rwkv_lite/server/app.py reads the bodies and submits the arguments.
"""
from __future__ import annotations

import json

from starlette.responses import JSONResponse

from ..chat_format import CHAT_REPLY_END, CHAT_STOP, ChatFormatError, chat_prompt_ids
from ..engine import MAX_TOP_LOGPROBS
from ..sampling import SamplingParams
from .reply import error_body

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


class RequestParser:
    """Turns request bodies into engine.submit() arguments (prompt ids, max_tokens, stop, SamplingParams,
    logprobs...) for one model; raises ApiError naming the field at fault. Tokenizes, so the server calls the
    completion_jobs/chat_jobs methods off the event loop."""

    def __init__(self, tokenizer, *, vocab_size: int, model_name: str, max_prompt_tokens: int, max_tokens: int):
        self.tokenizer = tokenizer
        self.vocab_size = int(vocab_size)
        self.model_name = model_name
        self.max_prompt_tokens = int(max_prompt_tokens)
        self.max_tokens = int(max_tokens)

    def body(self, raw: bytes) -> dict:
        """The JSON object of a request body; refuses fields this server does not implement and other models."""
        try:
            doc = json.loads(raw.decode("utf-8"))
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

    def completion_jobs(self, doc: dict) -> list[dict]:
        """/v1/completions: one set of engine arguments per prompt."""
        prompts = self.prompts(doc.get("prompt"))
        if doc.get("echo"):
            raise ApiError(400, "'echo' is not supported by this server", param="echo")
        if doc.get("best_of") not in (None, 1):
            raise ApiError(400, "'best_of' other than 1 is not supported", param="best_of")
        logprobs = _optional_int(doc, "logprobs", 0, MAX_TOP_LOGPROBS)
        return [dict(prompt=p, logprobs=logprobs, **self._generation_args(doc, default_max_tokens=16))
                for p in prompts]

    def chat_jobs(self, doc: dict) -> list[dict]:
        """/v1/chat/completions: the engine arguments of the one reply, in the World chat format."""
        ids, points = self.chat_prompt(doc.get("messages"))
        top = _optional_int(doc, "top_logprobs", 0, MAX_TOP_LOGPROBS)
        want = doc.get("logprobs")
        if want is not None and not isinstance(want, bool):
            raise ApiError(400, "'logprobs' must be true or false for chat completions", param="logprobs")
        if top is not None and not want:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        args = self._generation_args(doc, default_max_tokens=None)
        args["stop"] = (CHAT_STOP,) + args["stop"]
        return [dict(prompt=ids, logprobs=(top or 0) if want else None, cache_points=points,
                     reply_suffix=CHAT_REPLY_END, **args)]

    def prompts(self, prompt) -> list[list[int]]:
        """The `prompt` field: a string, a list of strings, a list of token ids, or a list of such lists."""
        tok = self.tokenizer
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
        V = self.vocab_size
        for ids in out:
            if any(not 0 <= t < V for t in ids):
                raise ApiError(400, f"prompt token ids must lie in 0..{V - 1}", param="prompt")
            self._check_length(ids)
        return out

    def chat_prompt(self, messages) -> tuple[list[int], list[int]]:
        """The World chat format prompt (rwkv_lite/chat_format.py) and the message boundaries (cache points)."""
        try:
            ids, points = chat_prompt_ids(self.tokenizer, messages)
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


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _optional_int(doc: dict, name: str, low: int, high: int) -> int | None:
    v = doc.get(name)
    if v is None:
        return None
    if not _is_int(v) or not low <= v <= high:
        raise ApiError(400, f"'{name}' must be a whole number in [{low}, {high}], got {v!r}", param=name)
    return v
