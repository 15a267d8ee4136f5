"""GET /metrics: the engine's and the prefix cache's counters in the Prometheus text exposition format."""
from __future__ import annotations

import math

from ..engine import Engine
from ..prefix_cache import PrefixCache


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
