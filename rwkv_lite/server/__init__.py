"""`rwkv-lite serve`: an OpenAI-compatible HTTP server over the continuous-batching engine (docs/server.md).

Needs the `server` extra (Starlette + uvicorn). One engine thread owns the batch and does all the computing
(rwkv_lite/engine.py); the event loop only parses requests, hands them to the engine and relays its events.

Routes: GET /health, GET /metrics (Prometheus text), GET /v1/models, GET /v1/models/{id}, POST /v1/completions,
POST /v1/chat/completions. With an API key every route but /health needs `Authorization: Bearer KEY`.

The modules: app.py (the Starlette app, routes, streaming, serve()), parse.py (request fields -> engine arguments,
ApiError), reply.py (OpenAI response objects, stream chunks, error objects), metrics.py (GET /metrics).
"""
from .app import Server, serve
from .metrics import prometheus_text
from .parse import ApiError

__all__ = ["Server", "serve", "prometheus_text", "ApiError"]
