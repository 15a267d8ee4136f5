"""`rwkv-lite serve`: the OpenAI-compatible HTTP server (rwkv_lite.server)."""
from __future__ import annotations

from pathlib import Path

import click

from . import common


@click.command()
@common.model_argument
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface; then set --api-key).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--max-batch", type=click.IntRange(1, 256), default=8, show_default=True,
              help="Requests generating at once (continuous batching).")
@click.option("--max-queue", type=click.IntRange(0, 100000), default=64, show_default=True,
              help="Requests waiting for a slot; beyond it the server answers 503 with Retry-After.")
@click.option("--api-key", envvar="RWKV_LITE_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on every route but /health (env RWKV_LITE_API_KEY).")
@click.option("--cache-mb", type=click.FloatRange(0), default=512, show_default=True,
              help="Memory for the prefix state cache (0: off).")
@click.option("--max-prompt-tokens", type=click.IntRange(1), default=8192, show_default=True,
              help="Longer prompts are refused (413).")
@click.option("--max-tokens", "max_tokens_limit", type=click.IntRange(1), default=2048, show_default=True,
              help="Largest max_tokens a request may ask for (and the chat default).")
@click.option("--prefill-chunk", type=click.IntRange(1), default=128, show_default=True,
              help="Prompt tokens read per engine step (bounds how long a new prompt pauses running streams).")
@click.option("--model-name", default=None, help="The model id clients use (default: the file name's stem).")
@click.option("--shutdown-timeout", type=click.FloatRange(0), default=30, show_default=True,
              help="On SIGTERM/Ctrl-C, seconds open streams may take to finish before they are cancelled.")
@click.option("--state", "state_in", type=click.Path(path_type=Path), default=None,
              help="Start every request from this state (a state-tuned .pth, or a saved state) instead of the "
                   "model's initial one.")
@common.threads_option
@common.friendly_errors
def serve(model, model_opt, host, port, max_batch, max_queue, api_key, cache_mb, max_prompt_tokens,
          max_tokens_limit, prefill_chunk, model_name, shutdown_timeout, state_in, threads):
    """An OpenAI-compatible HTTP server (needs the 'server' extra); see docs/server.md.

    \b
      pip install 'rwkv-lite[server]'
      rwkv-lite serve eagle-7b-int8.safetensors --port 8000 --max-batch 8
      curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
           -d '{"prompt": "The Eiffel tower is in", "max_tokens": 20}'
    """
    try:
        from .. import server as server_module
    except ImportError as e:
        missing = (e.name or "a dependency").split(".")[0]
        common.fail(f"rwkv-lite serve needs the server extra ({missing} is missing): "
                    "pip install 'rwkv-lite[server]'")
    common.set_threads(threads)
    path = common.model_path(model, model_opt)
    loaded = common.load_model(path)
    if state_in is not None:
        loaded.initial_state = common.load_state_for(loaded, state_in)
    name = model_name or path.stem                # "RWKV-x070-World-2.9B-v3.st" -> "RWKV-x070-World-2.9B-v3"

    def ready(srv):
        click.echo(f"serving {name} ({path.name}) on http://{host}:{port}/v1 (max batch {max_batch}"
                   f"{', API key required' if api_key else ''})", err=True)
    server_module.serve(loaded, host=host, port=port, model_name=name, max_batch=max_batch, max_queue=max_queue,
                        api_key=api_key, cache_mb=cache_mb, max_prompt_tokens=max_prompt_tokens,
                        max_tokens=max_tokens_limit, prefill_chunk=prefill_chunk,
                        shutdown_timeout=shutdown_timeout, ready=ready)
