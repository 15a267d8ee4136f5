"""The command line through click's test runner, on the converted tiny rwkv.cpp model (byte-level, English).

Every command is exercised end to end on a real model; error cases check the one-line message and exit code."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import shared_file
import rwkv_lite
from rwkv_lite import cli
from rwkv_lite.cli import chat_loop, common
from rwkv_lite.generate import ChatSession
from rwkv_lite.sampling import SamplingParams

# Common English words; a word also counts as English-like when it is made of letters (checked below).
ENGLISH = set("""the a an and or of to in on at for with by from as is are was were be been it its this that these
those he she they we you i his her their our your not no but if then so than there here which who what when where
how all any some one two can will would should could may might must do does did have has had make made time
people year way day man men world life work part place case point group number also only new first last long
great little own other old right big high different small large next early young important few public bad same
able software program free license general version copyright use used work works modify""".split())


def english_fraction(text: str) -> float:
    """Share of whitespace-separated words (punctuation stripped) that are common English words or plain
    lower/capitalised letter strings of a plausible length with a vowel."""
    words = [w.strip(".,;:!?\"'()[]") for w in text.split()]
    words = [w for w in words if w]
    if not words:
        return 0.0

    def english(w: str) -> bool:
        return (w.lower() in ENGLISH or
                (w.isalpha() and w.isascii() and len(w) <= 14 and (w.islower() or w.istitle())
                 and re.search(r"[aeiouy]", w.lower()) is not None))
    return sum(english(w) for w in words) / len(words)


@pytest.fixture(scope="module")
def tiny(tiny_fp32) -> Path:
    return tiny_fp32


@pytest.fixture(scope="module")
def english_text() -> Path:
    return shared_file("text", "english-gpl3-8k.txt")


MODEL_COMMANDS = {"generate", "chat", "perplexity", "bench"}


def run(*args, input=None, one_thread=True):
    """Invoke the CLI in-process. Model commands get `--threads 1` unless one_thread=False: the tiny model's
    64-wide matrices gain nothing from threads, and on a busy machine a thread pool costs them 10-30x."""
    args = [str(a) for a in args]
    if one_thread and args and args[0] in MODEL_COMMANDS and "--help" not in args:
        args += ["--threads", "1"]
    return CliRunner().invoke(cli.main, args, input=input, catch_exceptions=False)


@pytest.fixture(autouse=True, scope="module")
def restore_thread_count():
    """The CLI sets the process's thread count; give the next test module the count it had."""
    import numba
    before = numba.get_num_threads()
    yield
    from rwkv_lite.kernels.threads import set_threads
    set_threads(before)


def assert_one_line_error(result, code=1, *needles):
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# ------------------------------------------------------------------------------------------------ help
@pytest.mark.parametrize("command", ["convert", "generate", "chat", "perplexity", "bench", "info", "verify"])
def test_every_command_has_help_with_examples(command):
    result = run(command, "--help")
    assert result.exit_code == 0
    assert "Examples:" in result.stdout and f"rwkv-lite {command}" in result.stdout


def test_main_help_lists_every_command():
    out = run("--help").stdout
    for command in ["convert", "generate", "chat", "perplexity", "bench", "info", "verify"]:
        assert re.search(rf"^\s+{command}\s", out, re.M), command


# ------------------------------------------------------------------------------------------------ generate
def test_generate_greedy_from_the_prints_mostly_english_words(tiny):
    result = run("generate", tiny, "-p", "The ", "-n", "120", "--greedy")
    assert result.exit_code == 0, result.stderr
    text = result.stdout
    assert len(text.split()) >= 10
    assert english_fraction(text) >= 0.6, text


def test_generate_prompt_sources_agree(tiny, tmp_path):
    """-p, -f, stdin and --tokens are four ways to give the same prompt."""
    by_option = run("generate", tiny, "-p", "The cat ", "-n", "12", "--greedy").stdout
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("The cat ", encoding="utf-8")
    assert run("generate", tiny, "-f", prompt_file, "-n", "12", "--greedy").stdout == by_option
    assert run("generate", tiny, "-n", "12", "--greedy", input="The cat ").stdout == by_option
    ids = " ".join(str(b) for b in b"The cat ")
    assert run("generate", "--model", tiny, "--tokens", ids, "-n", "12", "--greedy").stdout == by_option
    assert len(by_option) > 0


def test_stop_string_is_not_printed_and_stops_generation(tiny):
    full = run("generate", tiny, "-p", "The ", "-n", "60", "--greedy").stdout
    stop = full[20:23]
    expected = full[:full.index(stop)]
    result = run("generate", tiny, "-p", "The ", "-n", "60", "--greedy", "--stop", stop)
    assert result.exit_code == 0
    assert result.stdout == expected
    doc = json.loads(run("generate", tiny, "-p", "The ", "-n", "60", "--greedy", "--stop", stop,
                         "--stop", "never appears", "--json").stdout)
    assert doc["text"] == expected and doc["stop_reason"] == "stop"
    assert doc["stats"]["generated_tokens"] < 60


def test_stop_understands_backslash_escapes():
    assert common.unescape(r"\n\nUser:") == "\n\nUser:"
    assert common.unescape(r"a\tb\\n\q") == "a\tb\\n\\q"


def test_same_seed_same_text_different_seed_different_text(tiny):
    args = ["generate", tiny, "-p", "The ", "-n", "40", "--temperature", "1.0", "--top-p", "0.95"]
    first = run(*args, "--seed", "3").stdout
    assert run(*args, "--seed", "3").stdout == first
    assert run(*args, "--seed", "4").stdout != first


def test_generate_json_document(tiny):
    result = run("generate", tiny, "-p", "The ", "-n", "16", "--seed", "1", "--top-k", "5", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["prompt"] == "The " and doc["prompt_ids"] is None and doc["model"] == str(tiny)
    assert doc["stop_reason"] == "max_tokens" and len(doc["tokens"]) == 16
    assert bytes(doc["tokens"]).decode("utf-8", errors="replace") == doc["text"]   # byte-level vocabulary
    assert doc["params"]["top_k"] == 5 and doc["params"]["seed"] == 1 and doc["params"]["temperature"] == 1.0
    stats = doc["stats"]
    assert stats["prompt_tokens"] == 4 and stats["generated_tokens"] == 16
    assert stats["prompt_tokens_per_s"] > 0 and stats["generation_tokens_per_s"] > 0
    assert 0 < stats["generation_seconds"] < 60
    assert 10e6 < stats["peak_rss_bytes"] < 20e9


def test_generate_verbose_prints_speeds_and_memory_to_stderr(tiny):
    result = run("generate", tiny, "-p", "The ", "-n", "8", "--greedy", "--verbose")
    assert result.exit_code == 0
    assert "tokens/s" in result.stderr and "peak RSS" in result.stderr
    assert "tokens/s" not in result.stdout


def test_state_files_continue_a_prompt(tiny, tmp_path):
    state = tmp_path / "the.state"
    assert run("generate", tiny, "-p", "The ", "-n", "0", "--save-state", state).exit_code == 0
    continued = run("generate", tiny, "--state", state, "-p", "cat ", "-n", "16", "--greedy").stdout
    assert continued == run("generate", tiny, "-p", "The cat ", "-n", "16", "--greedy").stdout


def test_model_without_tokenizer_takes_and_prints_ids(tiny, monkeypatch):
    real_load = common.load_model

    def load_without_tokenizer(path):
        model = real_load(path)
        model.tokenizer = None
        return model
    monkeypatch.setattr(common, "load_model", load_without_tokenizer)
    assert_one_line_error(run("generate", tiny, "-p", "The "), 1, "no tokenizer", "--prompt-ids")
    result = run("generate", tiny, "--tokens", "84,104,101,32", "-n", "5", "--greedy")
    assert result.exit_code == 0
    ids = [int(t) for t in result.stdout.split()]
    assert len(ids) == 5 and all(0 <= i < 256 for i in ids)


# ------------------------------------------------------------------------------------------------ demo model
def test_no_model_uses_the_demo_and_says_so_once(tiny, monkeypatch):
    import rwkv_lite.demo
    monkeypatch.setattr(rwkv_lite.demo, "demo_model_path", lambda: tiny)
    result = run("generate", "-p", "The ", "-n", "4", "--greedy")
    assert result.exit_code == 0
    assert result.stderr.count("built-in demo model") == 1


def test_no_model_and_no_demo_is_one_line(monkeypatch, tmp_path):
    import rwkv_lite.demo
    monkeypatch.setattr(rwkv_lite.demo, "DEMO_FILE", "no-such-demo.safetensors")
    assert_one_line_error(run("generate", "-p", "The "), 1, "demo model")


# ------------------------------------------------------------------------------------------------ errors
def test_missing_model_file(tmp_path):
    missing = tmp_path / "nope.safetensors"
    for args in (["generate", missing, "-p", "x"], ["chat", missing], ["info", missing],
                 ["perplexity", missing, __file__], ["bench", missing]):
        assert_one_line_error(run(*args), 1, str(missing))


def test_text_file_as_model(tmp_path, english_text):
    for args in (["generate", english_text, "-p", "x"], ["info", english_text], ["bench", english_text, "--no-probe"]):
        assert_one_line_error(run(*args), 1, str(english_text))


@pytest.mark.parametrize("option", [["--temperature", "-1"], ["--temperature", "nan"], ["--temperature", "abc"],
                                    ["--top-p", "1.5"], ["--top-k", "-2"], ["-n", "-1"],
                                    ["--greedy", "--temperature", "0.7"],
                                    ["--stop", ""], ["--tokens", "1 x"], ["--tokens", "999"], ["--tokens", ""]])
def test_bad_option_values_are_usage_errors(tiny, option):
    prompt = [] if option[0] == "--tokens" else ["-p", "The "]
    result = run("generate", tiny, *prompt, *option)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and "Error" in result.stderr


def test_conflicting_prompt_sources_and_double_model(tiny, tmp_path):
    assert run("generate", tiny, "-p", "a", "--tokens", "1").exit_code == 2
    assert run("generate", tiny, "--model", tiny, "-p", "a").exit_code == 2


def test_non_utf8_prompt_file_and_stdin(tiny, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("Café au lait".encode("latin-1"))
    assert_one_line_error(run("generate", tiny, "-f", bad), 1, str(bad), "not UTF-8")
    assert_one_line_error(run("generate", tiny, input=b"caf\xe9"), 1, "stdin", "not UTF-8")
    assert_one_line_error(run("perplexity", tiny, bad), 1, str(bad), "not UTF-8")


def test_prompt_too_long_for_memory_is_refused(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(common, "available_memory", lambda: 64 * 1000)    # room for 1000 bytes of text
    big = tmp_path / "big.txt"
    big.write_text("word " * 1000)
    assert_one_line_error(run("generate", tiny, "-f", big), 1, str(big), "too long")
    assert_one_line_error(run("generate", tiny, input="word " * 1000), 1, "stdin", "too long")
    assert run("generate", tiny, "-p", "The ", "-n", "2").exit_code == 0


def test_empty_prompt_on_a_byte_model(tiny):
    assert_one_line_error(run("generate", tiny, input=""), 1, "empty")


# ------------------------------------------------------------------------------------------------ chat
def chat_replies(output: str) -> list[str]:
    """Piped chat output: each reply followed by one empty line."""
    assert output.endswith("\n\n")
    return output[:-2].split("\n\n")


def test_chat_piped_three_turns_carries_the_state(tiny, tmp_path):
    """Three messages through the CLI; the state saved at the end equals the whole transcript read at once."""
    messages = ["Hello there", "What is free software?", "Thank you"]
    state_file = tmp_path / "chat.state"
    script = "\n".join(messages + [f"/save {state_file}"]) + "\n"
    result = run("chat", tiny, "--greedy", "--max-tokens", "24", input=script)
    assert result.exit_code == 0, result.stderr
    replies = chat_replies(result.stdout)
    assert len(replies) == 3
    assert "User:" not in result.stdout                       # no prompt when stdin is not a terminal

    # The same conversation through the API gives the same replies ...
    model = rwkv_lite.load(tiny)
    session = ChatSession(model, params=SamplingParams.greedy(), max_reply_tokens=24)
    assert [session.ask(m) for m in messages] == replies
    for m in messages:
        assert f"User: {m}\n\nAssistant:" in session.transcript
    # ... and the CLI's final state is that of the whole transcript processed in one call from the start.
    saved = rwkv_lite.State.load(state_file)
    _, whole = model.forward(model.tokenizer.encode(session.transcript))
    for name, array in whole.arrays.items():
        np.testing.assert_allclose(saved.arrays[name], array, rtol=1e-4, atol=1e-5, err_msg=name)


def test_chat_load_continues_a_saved_conversation(tiny, tmp_path):
    state_file = tmp_path / "hello.state"
    both = chat_replies(run("chat", tiny, "--greedy", "-n", "20", input="Hello\nHow are you?\n").stdout)
    assert run("chat", tiny, "--greedy", "-n", "20", input=f"Hello\n/save {state_file}\n").exit_code == 0
    resumed = run("chat", tiny, "--greedy", "-n", "20", input=f"/load {state_file}\nHow are you?\n")
    assert resumed.exit_code == 0 and "state loaded" in resumed.stderr
    assert chat_replies(resumed.stdout) == both[1:]
    by_option = run("chat", tiny, "--greedy", "-n", "20", "--state", state_file, input="How are you?\n")
    assert chat_replies(by_option.stdout) == both[1:]


def test_chat_reset_quit_and_slash_escape(tiny):
    result = run("chat", tiny, "--greedy", "-n", "16", input="Hello\n/reset\nHello\n//help\n/quit\nnot read\n")
    assert result.exit_code == 0
    replies = chat_replies(result.stdout)
    assert len(replies) == 3 and replies[0] == replies[1]
    assert "reset" in result.stderr


def test_chat_errors_in_a_script_are_fatal(tiny, tmp_path):
    assert_one_line_error(run("chat", tiny, input="/frobnicate\n"), 1, "unknown command")
    assert_one_line_error(run("chat", tiny, input=f"/load {tmp_path / 'none.state'}\n"), 1, "none.state")
    assert_one_line_error(run("chat", tiny, input="/save\n"), 1, "/save needs a file name")
    assert_one_line_error(run("chat", tiny, input=b"caf\xe9\n"), 1, "stdin line 1")


class InterruptingModel:
    """The real model, except that forward call number `at` (forward or forward_in_place, whichever the
    generation loop uses) raises KeyboardInterrupt (Ctrl-C mid-answer)."""

    def __init__(self, model, at: int):
        self._model, self._at, self.calls = model, at, 0

    def __getattr__(self, name):
        return getattr(self._model, name)

    def _count(self):
        self.calls += 1
        if self.calls == self._at:
            raise KeyboardInterrupt

    def forward(self, *args, **kwargs):
        self._count()
        return self._model.forward(*args, **kwargs)

    def forward_in_place(self, *args, **kwargs):
        self._count()
        return self._model.forward_in_place(*args, **kwargs)


def test_chat_interactive_ctrl_c_stops_the_answer_not_the_chat(tiny, monkeypatch):
    real_load = common.load_model
    monkeypatch.setattr(common, "load_model", lambda path: InterruptingModel(real_load(path), at=5))
    monkeypatch.setattr(common, "stdin_is_interactive", lambda: True)
    typed = iter(["Hello", KeyboardInterrupt, "Hi again", KeyboardInterrupt, KeyboardInterrupt, "never read"])

    def read_line(prompt):
        assert prompt == "User: "
        item = next(typed)
        if item is KeyboardInterrupt:
            raise KeyboardInterrupt
        return item
    monkeypatch.setattr(common, "read_line", read_line)
    result = run("chat", tiny, "--greedy", "-n", "12")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.count("Assistant: ") == 2                  # both messages were answered
    assert "(answer stopped)" in result.stderr                      # the first answer was cut by Ctrl-C
    assert "Ctrl-C again" in result.stderr
    assert next(typed) == "never read"                              # the second Ctrl-C in a row ended the chat


# ----------------------------------------------------------------------------------------- info, perplexity, bench
def test_info_json(tiny):
    doc = json.loads(run("info", tiny, "--json").stdout)
    assert doc["architecture"] and doc["tokenizer"] == "bytes"
    assert doc["file_bytes"] == tiny.stat().st_size
    assert 500_000 < doc["parameters"] < 1_000_000                  # "730K"
    assert doc["bits_per_weight"] == pytest.approx(32.0)
    assert doc["config"]["n_layer"] == 12 and doc["config"]["vocab_size"] == 256
    human = run("info", tiny)
    assert human.exit_code == 0 and "parameters" in human.stdout


def test_perplexity_of_english_is_far_below_shuffled_bytes(tiny, english_text, tmp_path):
    data = english_text.read_bytes()
    shuffled = tmp_path / "shuffled.txt"
    shuffled.write_bytes(bytes(np.random.default_rng(0).permutation(np.frombuffer(data, np.uint8))))
    english = json.loads(run("perplexity", tiny, english_text, "--json").stdout)
    noise = json.loads(run("perplexity", tiny, shuffled, "--json").stdout)
    assert english["tokens"] == len(data) and english["predicted"] == len(data) - 1
    assert english["bytes"] == len(data) - 1
    assert english["perplexity"] == pytest.approx(math.exp(english["nll"]))
    assert english["bits_per_byte"] == pytest.approx(english["nll"] / math.log(2))   # one byte per token
    assert 1.0 < english["perplexity"] < 20 and english["bits_per_byte"] < 4.0
    assert noise["perplexity"] > 2.5 * english["perplexity"]
    assert english["tokens_per_s"] > 0


def test_perplexity_human_output_limit_and_arguments(tiny, english_text, monkeypatch):
    result = run("perplexity", tiny, english_text, "--max-tokens", "300")
    assert result.exit_code == 0
    assert re.search(r"tokens\s+300 ", result.stdout) and "perplexity" in result.stdout
    assert run("perplexity", "--model", tiny, english_text, "--max-tokens", "50", "--quiet").exit_code == 0
    assert run("perplexity").exit_code == 2
    assert run("perplexity", tiny, english_text, english_text).exit_code == 2


def test_bench_json(tiny):
    result = run("bench", tiny, "--tokens", "4", "--prompt-lengths", "16", "--no-probe", "--json", one_thread=False)
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["decode_tokens"] == 4 and doc["threads"] >= 1
    assert 0 < doc["decode_ms_min"] <= doc["decode_ms_per_token"] <= doc["decode_ms_max"] < 10_000
    assert set(doc["prompt_tokens_per_s"]) == {"16"} and doc["prompt_tokens_per_s"]["16"] > 0
    assert 0 < doc["load_s"] <= doc["load_to_first_logits_s"]
    assert doc["file_bytes"] == tiny.stat().st_size and doc["bytes_read_per_token"] > 0
    assert doc["peak_rss_bytes"] > 10e6 and "bandwidth_gb_s" not in doc


def test_bench_table_and_bad_lengths(tiny):
    result = run("bench", tiny, "--tokens", "2", "--prompt-lengths", "8", "--no-probe")
    assert result.exit_code == 0 and "ms/token" in result.stdout and "peak RSS" in result.stdout
    assert run("bench", tiny, "--prompt-lengths", "8,x", "--no-probe").exit_code == 2
    assert run("bench", tiny, "--prompt-lengths", "0", "--no-probe").exit_code == 2


def test_verify(tiny):
    result = run("verify", tiny)
    assert result.exit_code == 0 and "OK" in result.stdout
    assert json.loads(run("verify", tiny, "--json").stdout)["ok"] is True
