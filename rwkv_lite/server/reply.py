"""What the server sends back, in OpenAI's shapes: the completion and chat.completion objects, whole or as
streamed chunks (Reply accumulates one HTTP request's choices from the engine's Steps), the server-sent event
framing (sse) and the error object (error_body).
"""
from __future__ import annotations

import json

from ..engine import Step


def error_body(message: str, kind: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def sse(doc) -> str:
    return f"data: {json.dumps(doc, ensure_ascii=False)}\n\n"


def openai_finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


class Reply:
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
                                "finish_reason": openai_finish_reason(self.finish[i])})
            else:
                choices.append({"index": i, "text": text,
                                "logprobs": self._completion_logprobs(self.logprobs[i]) if wants_logprobs else None,
                                "finish_reason": openai_finish_reason(self.finish[i])})
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": self.usage()}

    def _chunk_doc(self, kind: str, choice: dict, include_usage: bool) -> dict:
        doc = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": [choice]}
        if include_usage:
            doc["usage"] = None
        return doc

    def chunk(self, index, delta, logprobs, finish_reason, include_usage) -> dict:
        return self._chunk_doc("chat.completion.chunk", {"index": index, "delta": delta, "logprobs": logprobs,
                                                         "finish_reason": finish_reason}, include_usage)

    def text_chunk(self, index, text, entry, finish_reason, include_usage) -> dict:
        if self.chat:
            delta = {"content": text} if text or finish_reason is None else {}
            logprobs = {"content": [entry]} if entry is not None else None
            return self.chunk(index, delta, logprobs, finish_reason, include_usage)
        return self._chunk_doc("text_completion", {
            "index": index, "text": text, "logprobs": self._completion_logprobs([entry]) if entry is not None else None,
            "finish_reason": finish_reason}, include_usage)

    def usage_chunk(self) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [], "usage": self.usage()}
