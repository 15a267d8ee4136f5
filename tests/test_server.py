"""`rwkv-lite serve` driven by the official `openai` client against live servers on 127.0.0.1 (random free ports),
with the built-in demo model: completions and chat, streamed and not; concurrency does not change any request's
text; cancellation frees a slot; a full queue answers 503; the API key; bad input gets the right status and an
error object while the server keeps serving; prefix-cache hits in `usage`; a bounded soak keeps RSS flat;
SIGTERM ends streams cleanly. Skipped without the server and test extras."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

KEY = "sk-test-key"
MODEL = "demo-kjv-int8"
PROMPTS = ["And God said", "In the beginning", "The LORD is my shepherd", "Blessed are the",
           "And it came to pass, when", "Jesus wept.", "Then", "Verily, verily, I say unto you"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, *args: str):
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "rwkv_lite", "serve", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.log: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(self.base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("server did not start:\n" + "".join(self.log))
            time.sleep(0.2)

    def _drain(self):
        for line in self.proc.stdout:
            self.log.append(line)

    def client(self, key=KEY, **kwargs) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.base + "/v1", api_key=key, max_retries=0, timeout=120, **kwargs)

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def server():
    s = LiveServer("--max-batch", "8", "--api-key", KEY, "--max-prompt-tokens", "300", "--max-tokens", "600",
                   "--cache-mb", "8")
    yield s
    s.stop()


def _greedy_completion(client, prompt, max_tokens=16, **kw):
    return client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, **kw)


def test_completion_streamed_and_not(server):
    client = server.client()
    whole = _greedy_completion(client, "And God said", max_tokens=20)
    choice = whole.choices[0]
    assert choice.finish_reason == "length" and len(choice.text) == 20          # byte-level model: 1 char/token
    assert whole.usage.prompt_tokens == 12 and whole.usage.completion_tokens == 20
    pieces, finish = [], None
    for chunk in _greedy_completion(client, "And God said", max_tokens=20, stream=True):
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == choice.text and finish == "length"
    stopped = _greedy_completion(client, "And God said", max_tokens=50, stop=[choice.text[5:9]])
    assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].text == choice.text[:5]


def test_chat_streamed_and_not_with_usage(server):
    client = server.client()
    messages = [{"role": "system", "content": "You are the King James Bible."},
                {"role": "user", "content": "Who  made\n\n\nthe heaven?"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0)
    message = whole.choices[0].message
    assert message.role == "assistant" and message.content and not message.content.startswith(" ")
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_format_and_roles(server):
    """The prompt is the World chat format with the chat command's normalisation; unknown roles are refused."""
    client = server.client()
    messages = [{"role": "developer", "content": " Be brief. "}, {"role": "user", "content": "Hi\r\n\r\nthere"}]
    got = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1, temperature=0)
    assert got.usage.prompt_tokens == len("System: Be brief.\n\nUser: Hi\nthere\n\nAssistant:")
    with pytest.raises(openai.BadRequestError, match="role 'tool' is not supported"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "tool", "content": "x"}], max_tokens=1)


def test_logprobs(server):
    client = server.client()
    got = _greedy_completion(client, "And God", max_tokens=3, logprobs=3)
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == 3 and "".join(lp.tokens) == got.choices[0].text
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and max(top.values()) == pytest.approx(logprob) and top[token] == pytest.approx(logprob)
        assert logprob <= 0
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 2 and all(len(c.top_logprobs) == 2 for c in content)


def test_concurrent_greedy_requests_give_their_solo_text(server):
    client = server.client()
    solo = [_greedy_completion(client, p, max_tokens=24).choices[0].text for p in PROMPTS]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda p: _greedy_completion(client, p, max_tokens=24).choices[0].text, PROMPTS))
    assert together == solo


def test_seeded_sampling_same_alone_and_under_load(server):
    client = server.client()

    def sampled():
        return client.completions.create(model=MODEL, prompt="And the LORD", max_tokens=30, temperature=1.0,
                                         top_p=0.95, seed=1234).choices[0].text
    alone = sampled()
    with ThreadPoolExecutor(8) as pool:
        load = [pool.submit(_greedy_completion, client, p, 40) for p in PROMPTS[:7]]
        under_load = sampled()
        [f.result() for f in load]
    assert under_load == alone
    other_seed = client.completions.create(model=MODEL, prompt="And the LORD", max_tokens=30, temperature=1.0,
                                           top_p=0.95, seed=99).choices[0].text
    assert other_seed != alone


def test_chat_second_turn_reads_only_new_tokens(server):
    client = server.client()
    messages = [{"role": "system", "content": "A psalm, with a unique start 9f3a."},
                {"role": "user", "content": "Sing."}]
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=200, temperature=0,
                                           stop=[","])
    assert first.choices[0].finish_reason == "stop"
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    turn2 = messages + [{"role": "assistant", "content": first.choices[0].message.content},
                        {"role": "user", "content": "Again."}]
    second = client.chat.completions.create(model=MODEL, messages=turn2, max_tokens=20, temperature=0)
    # the whole first prompt (system message, user turn, "Assistant:") is not read again; the reply ended by a
    # stop string of the user's, not by "\n\n", so its own state is not cached
    assert second.usage.prompt_tokens_details.cached_tokens == len(
        "System: A psalm, with a unique start 9f3a.\n\nUser: Sing.\n\nAssistant:")
    metrics = httpx.get(server.base + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert "rwkv_lite_prefix_cache_hits_total" in metrics


def test_bad_inputs_get_the_right_status_and_an_error_object(server):
    client = server.client()
    auth = {"Authorization": f"Bearer {KEY}"}
    cases = [
        (b"{not json", 400),
        (json.dumps({"model": "gpt-4", "prompt": "x"}).encode(), 404),
        (json.dumps({"prompt": "x" * 301}).encode(), 413),
        (json.dumps({"prompt": "x", "temperature": -1}).encode(), 400),
        (json.dumps({"prompt": "x", "max_tokens": 601}).encode(), 400),
        (json.dumps({"prompt": "x", "n": 2}).encode(), 400),
        (json.dumps({"prompt": 5}).encode(), 400),
        (json.dumps({"prompt": [1, 2, 999]}).encode(), 400),
        (json.dumps({"prompt": "x", "logprobs": 9}).encode(), 400),
        (json.dumps([1, 2]).encode(), 400),
    ]
    for body, status in cases:
        r = httpx.post(server.base + "/v1/completions", content=body, headers=auth, timeout=30)
        assert r.status_code == status, (body, r.text)
        error = r.json()["error"]
        assert error["message"] and error["type"]
    r = httpx.post(server.base + "/v1/chat/completions", json={"messages": []}, headers=auth)
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    r = httpx.get(server.base + "/v1/nothing", headers=auth)
    assert r.status_code == 404 and r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    assert _greedy_completion(client, "And", max_tokens=2).choices[0].finish_reason == "length"   # still serving


def test_api_key_is_enforced(server):
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").completions.create(model=MODEL, prompt="x", max_tokens=1)
    assert httpx.get(server.base + "/v1/models").status_code == 401
    assert httpx.get(server.base + "/metrics").status_code == 401
    assert httpx.get(server.base + "/health").status_code == 200                # open for health checks
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_soak_keeps_memory_flat(server):
    """200 mixed requests (completion/chat, streamed or not, greedy or sampled, some cancelled early): RSS
    grows by no more than the bounded prefix cache (8 MB here) plus allocator slack."""
    client = server.client()

    def one(i):
        prompt = PROMPTS[i % len(PROMPTS)] + f" {i}"
        if i % 4 == 0:
            return _greedy_completion(client, prompt, max_tokens=4).choices[0].text
        if i % 4 == 1:
            return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                                  max_tokens=4, seed=i).choices[0].message.content
        if i % 4 == 2:
            stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=50, stream=True, seed=i)
            for n, _ in enumerate(stream):
                if n == 2:
                    stream.close()                          # a client that goes away mid-stream
                    break
            return ""
        return "".join(c.choices[0].text for c in client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=4, stream=True) if c.choices)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(40)))                      # warm up (allocator pools, caches)
        before = server.rss_bytes()
        list(pool.map(one, range(40, 200)))
        after = server.rss_bytes()
    assert after - before < (8 + 24) * 2**20, (before, after)
    assert _greedy_completion(client, "And", max_tokens=2).choices[0].finish_reason == "length"


def test_cancelled_stream_frees_its_slot_and_full_queue_is_503():
    s = LiveServer("--max-batch", "1", "--max-queue", "1", "--max-tokens", "10000000")
    try:
        client = s.client()
        # so many tokens that the stream still holds its slot however fast the CPU is
        stream = client.completions.create(model=MODEL, prompt="And", max_tokens=10000000, stream=True)
        next(iter(stream))                                  # running, holding the only slot
        waiting = ThreadPoolExecutor(1).submit(_greedy_completion, client, "God", 3)
        deadline = time.monotonic() + 30
        while "rwkv_lite_queue_length 1" not in httpx.get(s.base + "/metrics").text:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = httpx.post(s.base + "/v1/completions", json={"prompt": "x", "max_tokens": 1})
        assert r.status_code == 503 and r.headers["retry-after"] and r.json()["error"]["code"] == "queue_full"
        stream.close()                                      # the client goes away: its slot is freed
        assert waiting.result(timeout=60).choices[0].finish_reason == "length"
        assert "rwkv_lite_requests_rejected_total 1" in httpx.get(s.base + "/metrics").text
    finally:
        s.stop()


def test_sigterm_ends_open_streams_cleanly():
    # The demo model writes thousands of tokens a second on a fast CPU: ask for so many that the
    # stream is certainly still open when SIGTERM arrives.
    s = LiveServer("--max-batch", "2", "--shutdown-timeout", "2", "--max-tokens", "10000000")
    try:
        with httpx.stream("POST", s.base + "/v1/completions", timeout=60,
                          json={"prompt": "And", "max_tokens": 10000000, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            s.proc.send_signal(signal.SIGTERM)
            rest = list(lines)                              # the stream ends (no hang, no broken chunked body)
        events = [line[6:] for line in rest if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert "error" in json.loads(events[-2])            # cancelled at shutdown: said so in the stream
        # uvicorn re-raises the signal once it has shut down, so the exit status is "terminated by SIGTERM"
        assert s.proc.wait(30) in (0, -signal.SIGTERM)
        time.sleep(0.2)
        assert "Application shutdown complete" in "".join(s.log)
    finally:
        s.stop()
