"""Generation: the token-level core (`stream_generate`), text streaming (`generate`) and chat, for every RWKV
version.

    for step in stream_generate(model, "The Eiffel tower is in the city of", SamplingParams(max_tokens=20)):
        print(step.text, end="", flush=True)  # step.token, step.logprob; step.finish_reason on the last step

    gen = generate(model, "The Eiffel tower is in the city of", max_tokens=50, params=SamplingParams(seed=1))
    for piece in gen:                 # UTF-8-safe text pieces, as they are produced
        print(piece, end="", flush=True)
    gen.stats                         # token counts, timings, why it stopped
    gen.state                         # the model state after the prompt and every generated token

The loop, one token at a time (the prompt goes through the model in one call, in sequence mode):

    logits --SequenceSampler (penalties, sample, decode, stop strings)--> Step
       ^                                                                   |
       +---------- model.forward([token], state) (done just before the next sample) <-+

Each sampled token is fed to the model only when the next token is needed. So a step reaches the caller one
forward pass earlier, and the last token of a generation is not fed at all unless someone asks for `.state`
(which then feeds it, once). The per-sequence part (rwkv_lite/sequence.py) is the same one the batched engine
runs for each of its sequences.

Only `model.forward(ids, state) -> (logits, new_state)`, `model.tokenizer` (None: ids are printed as text),
`model.config["vocab_size"]` and states' `copy()`/`save()` are used, so this works for every model version. It
relies on forward() leaving the state passed in untouched (as rwkv_lite.Model does): if a forward call is
interrupted (Ctrl-C), the previous state is still valid and the tokens it had not seen are simply still pending.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from rwkv_lite.sampling import DIGITS_AND_SPACES, SamplingParams
from rwkv_lite.sequence import (GenerationError, IdsAsText, SequenceSampler, Step, check_max_tokens, check_stop,
                                prefix_overlap, text_of)

__all__ = ["generate", "stream_generate", "generate_text", "Generation", "GenerationStats", "GenerationError",
           "Step", "SamplingParams", "ChatSession", "ThinkingSplitter", "IdsAsText"]

DEFAULT_MAX_TOKENS = 100        # when neither max_tokens nor params.max_tokens is given


@dataclass
class GenerationStats:
    """Counts and timings of one generation.

    prompt_seconds      the forward call over the prompt
    generation_seconds  model + sampler time for the generated tokens (time spent by the caller between pieces
                        is not counted; the final token's forward pass, done only if .state is read, is not either)
    stop_reason         "stop" (a stop string), "end_of_text", "max_tokens", or "interrupted" (closed early by
                        the caller, an exception, Ctrl-C); "" while running
    """

    prompt_tokens: int = 0
    generated_tokens: int = 0
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0
    stop_reason: str = ""

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def generation_tokens_per_second(self) -> float:
        return self.generated_tokens / self.generation_seconds if self.generation_seconds > 0 else 0.0


class Generation:
    """One generation: an iterator over its text pieces (`generate()`) or over its Steps (`stream_generate()`).

    Attributes, live while iterating and final after it: `tokens` (generated ids, without a stopping
    end-of-text), `text` (everything yielded so far), `stats` (GenerationStats), `finish_reason` (None, then
    "stop" or "length"), `finished`; and `state`. Stop iterating at any time (break, close(), Ctrl-C): `tokens`
    and `state` stay consistent with each other.

    Keyword arguments beyond generate()'s, used by ChatSession:
      yields               "text" (pieces, the default) or "steps" (Step objects)
      logprobs             None, or n >= 0: Steps carry logprob (and n top_logprobs); see SequenceSampler
      rng                  numpy Generator to draw from (default: params.make_rng())
      ban_end_of_text      never sample end-of-text (the chat demos suppress it during a reply)
      penalty_exempt_text  see Penalties (None: every generated token counts with weight 1)
      on_finish            called once with this Generation when it ends, however it ends
    """

    def __init__(self, model, prompt: str | Sequence[int], *, max_tokens: int | None = None,
                 params: SamplingParams | None = None, stop: Sequence[str] | None = None, state=None,
                 on_token: Callable[[int], None] | None = None, yields: str = "text", logprobs: int | None = None,
                 rng: np.random.Generator | None = None, ban_end_of_text: bool = False,
                 penalty_exempt_text: str | None = DIGITS_AND_SPACES,
                 on_finish: Callable[["Generation"], None] | None = None):
        if yields not in ("text", "steps"):
            raise ValueError(f"yields must be 'text' or 'steps', got {yields!r}")
        params = params if params is not None else SamplingParams()
        if max_tokens is None:
            max_tokens = params.max_tokens if params.max_tokens is not None else DEFAULT_MAX_TOKENS
        max_tokens = check_max_tokens(max_tokens)
        stop = check_stop(params.stop if stop is None else stop)
        if model.tokenizer is None and isinstance(prompt, str):
            raise GenerationError("this model has no tokenizer: give the prompt as token ids")
        tokenizer = text_of(model)
        self._sampler = SequenceSampler(tokenizer, params, max_tokens=max_tokens, stop=stop, rng=rng,
                                        ban_end_of_text=ban_end_of_text, penalty_exempt_text=penalty_exempt_text,
                                        logprobs=logprobs)
        self.params = self._sampler.params

        prompt_ids = tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not prompt_ids:
            if state is not None or self._sampler.eot is None:
                raise GenerationError("the prompt is empty: give at least one token to continue from")
            prompt_ids = [self._sampler.eot]  # an empty prompt starts a fresh document, which follows end-of-text

        self.model = model
        self.text = ""
        self.stats = GenerationStats(prompt_tokens=len(prompt_ids))
        self.finished = False
        self._yields = yields
        self._on_token = on_token
        self._on_finish = on_finish
        # The model has seen (prompt + tokens) minus _unfed; _logits are its output after the last fed token.
        self._state = state
        self._state_ours = False      # _state was made by this Generation and never handed out (see _feed)
        self._spare = None            # a state of ours to compute the next step into
        self._unfed: list[int] = prompt_ids
        self._logits = None
        self.prompt_fed = False
        self._steps = self._run()

    # -- iteration ---------------------------------------------------------------------------------------------
    def __iter__(self) -> "Generation":
        return self

    def __next__(self):
        if self._yields == "steps":
            return next(self._steps)
        while True:
            step = next(self._steps)
            if step.text:
                return step.text

    def close(self) -> None:
        """Stop generating (also fine before the first piece or after the end)."""
        self._steps.close()
        self._finish("interrupted")

    @property
    def tokens(self) -> list[int]:
        return self._sampler.tokens

    @property
    def finish_reason(self) -> str | None:
        return self._sampler.finish_reason

    @property
    def state(self):
        """The model state after the prompt and every id in `tokens`.

        The last sampled token is normally not fed to the model yet (it is fed just before the next sample);
        reading `state` feeds it now, once (one forward call)."""
        if self._unfed:
            self._feed()
        self._state_ours = False      # the caller may keep it: never reuse its memory
        return self._state

    @property
    def unfed_tokens(self) -> list[int]:
        """Ids in (prompt + tokens) that the model has not processed yet (usually the last sampled one)."""
        return list(self._unfed)

    # -- the loop ----------------------------------------------------------------------------------------------
    def _feed(self) -> None:
        # The step writes a second state, so that an interrupted call (Ctrl-C) leaves the previous, valid state in
        # place. From the third step on that is the memory of the state before last (double buffering): a fresh
        # copy's pages must be faulted in (~30 ms for a 1.5B model's 12.6 MB state on a small VM, where a token
        # takes ~30 ms), a reused buffer's need not; and the step reads the previous state as its source, so
        # that a version that can (RWKV-7) need not copy it first.
        spare = self._spare
        if spare is not None and self._state is not None and hasattr(self.model, "forward_in_place"):
            logits, state = self.model.forward_in_place(self._unfed, spare, source=self._state), spare
        else:
            logits, state = self.model.forward(self._unfed, self._state)
        previous, previous_ours = self._state, self._state_ours
        self._logits, self._state, self._unfed = logits, state, []
        self._state_ours = True
        self._spare = previous if previous_ours else spare
        self.prompt_fed = True

    def _run(self) -> Iterator[Step]:
        stats, sampler = self.stats, self._sampler
        try:
            start = time.perf_counter()
            if self._unfed:  # (already fed if .state was read before iterating)
                self._feed()  # the whole prompt, in one call (sequence mode)
            stats.prompt_seconds = time.perf_counter() - start
            while True:
                start = time.perf_counter()
                if sampler.ending is not None:
                    step = sampler.final_step()
                else:
                    if self._unfed and len(sampler.tokens) < sampler.max_tokens:
                        self._feed()
                    step = sampler.next_step(self._logits)
                stats.generation_seconds += time.perf_counter() - start
                if step.token is not None:
                    self._unfed = [step.token]
                    stats.generated_tokens += 1
                    if self._on_token is not None:
                        self._on_token(step.token)
                self.text += step.text
                if step.finish_reason is not None:
                    self._finish(sampler.cause)
                    yield step
                    return
                yield step
        finally:
            self._finish("interrupted")

    def _finish(self, reason: str) -> None:
        if self.finished:
            return
        self.finished = True
        self.stats.stop_reason = reason
        self._state_ours = False      # on_finish (ChatSession) takes the state over: never reuse its memory
        if self._on_finish is not None:
            self._on_finish(self)


def stream_generate(model, prompt: str | Sequence[int], params: SamplingParams | None = None, state=None, *,
                    max_tokens: int | None = None, stop: Sequence[str] | None = None,
                    logprobs: int = 0) -> Generation:
    """Generate after `prompt`, one Step per generated token, then one final Step (token None, finish_reason
    "stop" or "length", any text that was held back).

    prompt      text (encoded with model.tokenizer) or token ids; fed to the model in one call. Empty text starts
                from end-of-text (a fresh document) when there is no `state`.
    params      SamplingParams (default SamplingParams()); its max_tokens (default 100) and stop strings apply
                unless `max_tokens` / `stop` are given here.
    state       the state to continue from (None: the model's initial state). It is not modified.
    logprobs    each token Step carries its logprob (log-softmax of the raw logits) and this many top_logprobs.

    Step texts join to the generated text (UTF-8 safe; a stop string and what follows it are never in it).
    The returned Generation also has .tokens, .text, .stats and .state (see generate())."""
    return Generation(model, prompt, max_tokens=max_tokens, params=params, stop=stop, state=state,
                      yields="steps", logprobs=logprobs)


def generate(model, prompt: str | Sequence[int], *, max_tokens: int | None = None,
             params: SamplingParams | None = None, stop: Sequence[str] | None = None, state=None,
             on_token: Callable[[int], None] | None = None) -> Generation:
    """Generate up to `max_tokens` tokens after `prompt`, yielding UTF-8-safe text pieces as they come.

    prompt    text (encoded with model.tokenizer) or token ids; fed to the model in one call. Empty text starts
              from end-of-text (a fresh document) when there is no `state`. A model without a tokenizer takes
              ids and writes each generated id as "ID ".
    params    SamplingParams (default: SamplingParams()); its max_tokens and stop apply unless given here.
    stop      strings that end the generation. They may span tokens; the stop string and anything after it is
              not yielded (text that could be the start of a stop string is held back until it is not).
    state     the state to continue from (None: the model's initial state). It is not modified.
    on_token  called with every generated id (including ids whose text is still held back).

    Stops at end-of-text (not fed, not in .tokens), at a stop string, or after max_tokens (default
    params.max_tokens, else 100). Returns a Generation: iterate it for the pieces, then read .stats, .tokens,
    .text and .state. Built on the same loop as stream_generate()."""
    return Generation(model, prompt, max_tokens=max_tokens, params=params, stop=stop, state=state,
                      on_token=on_token)


def generate_text(model, prompt: str | Sequence[int], **kwargs) -> str:
    """generate() without streaming: the whole generated text (same arguments)."""
    return "".join(generate(model, prompt, **kwargs))


class ThinkingSplitter:
    """Splits a think-mode reply, streamed in pieces, into its reasoning and its answer at the first "</think>"
    (which may arrive split over pieces). push() and flush() return [(kind, text)], kind "thinking" (up to and
    including "</think>") or "answer"."""

    def __init__(self):
        self.thinking = True
        self._held = ""

    def push(self, piece: str) -> list[tuple[str, str]]:
        if not self.thinking:
            return [("answer", piece)] if piece else []
        text = self._held + piece
        end = text.find(THINK_END)
        if end >= 0:
            self.thinking, self._held = False, ""
            cut = end + len(THINK_END)
            return [("thinking", text[:cut])] + ([("answer", text[cut:])] if text[cut:] else [])
        keep = prefix_overlap(text, THINK_END)
        self._held = text[len(text) - keep:] if keep else ""
        shown = text[:len(text) - keep]
        return [("thinking", shown)] if shown else []

    def flush(self) -> list[tuple[str, str]]:
        held, self._held = self._held, ""
        return [("thinking", held)] if held else []


# ---------------------------------------------------------------------------------------------------------------
# Chat

# The reference chat demo's warm-up exchange (used when no saved state is loaded).
DEFAULT_PREAMBLE = ("User: hi\n\nAssistant: Hi. I am your assistant and I will provide expert full response in "
                    "full details. Please feel free to ask any question and I will always answer it.\n\n")
TURN_SEPARATOR = "\n\n"
THINK_START = " <think"          # RWKV-7 G1's think mode: the assistant turn starts with it; the model writes
THINK_END = "</think>"           # its reasoning (">...") up to this, then the answer


def normalize_message(message: str) -> str:
    """A user message as the World chat format needs it: stripped, "\\r\\n" -> "\\n", newline runs collapsed to
    one "\\n" (so "\\n\\n" only ever separates turns). The reference collapses before converting "\\r\\n", which
    lets "\\r\\n\\r\\n" through as "\\n\\n"; we convert first."""
    text = message.replace("\r\n", "\n").replace("\r", "\n").strip()
    return re.sub(r"\n+", "\n", text)


class ChatSession:
    """A conversation in the World chat format, with the state kept between turns.

        chat = ChatSession(model)
        for piece in chat.reply("What is the capital of France?"):
            print(piece, end="", flush=True)

    The transcript is  preamble + "User: <msg>\\n\\nAssistant:" + reply + "\\n\\n" + "User: ..."; the model writes
    the space after "Assistant:" itself. With think=True (RWKV-7 G1's think mode) each turn ends with
    "Assistant: <think" and the reply is the model's reasoning, "</think>", then its answer (ThinkingSplitter
    separates them). A reply ends when the model writes "\\n\\n" (not shown), and end-of-text
    is never sampled during a reply (as in the reference chat demo). Each reply uses fresh penalties with weight 1
    for every token (the chat demo's convention) and `params` (default SamplingParams.chat()).

    History is never re-processed: only new tokens go through the model. Tokens that are part of the
    transcript but not yet seen by the model (the reply's last token, a closing "\\n\\n") are fed together with
    the next message, in one call.

    Interrupting a reply (break, close(), Ctrl-C) keeps the transcript consistent: the part of the reply
    generated so far stays in the history and is closed with "\\n\\n" as if the model had ended it there (it
    may include a little text that was held back and never shown). If the interruption comes while the new
    message itself is being read (before the first reply token), the turn is dropped entirely.
    """

    def __init__(self, model, *, params: SamplingParams | None = None, preamble: str | None = DEFAULT_PREAMBLE,
                 max_reply_tokens: int = 1024, think: bool = False):
        if model.tokenizer is None:
            raise GenerationError("this model has no tokenizer: it cannot chat")
        self.model = model
        self.params = params if params is not None else SamplingParams.chat()
        self.preamble = preamble or ""
        self.max_reply_tokens = max_reply_tokens
        self.think = think
        self._active: Generation | None = None
        self.reset()

    @property
    def history(self) -> list[int]:
        """Token ids of the transcript since reset() / load_state() (preamble, turns, replies, separators)."""
        return list(self._history)

    @property
    def transcript(self) -> str:
        return self.model.tokenizer.decode(self._history)

    def reset(self) -> None:
        """Forget the conversation: back to the initial state (plus the preamble, read with the first message)."""
        self._close_active()
        self._state = None
        self._pending = self.model.tokenizer.encode(self.preamble) if self.preamble else []
        self._history = list(self._pending)
        self._rng = self.params.make_rng()

    def reply(self, message: str) -> Generation:
        """Send `message`; returns a Generation streaming the reply's text (without the closing "\\n\\n")."""
        self._close_active()
        message = normalize_message(message)
        if not message:
            raise GenerationError("the message is empty")
        turn = self.model.tokenizer.encode(f"User: {message}\n\nAssistant:" + (THINK_START if self.think else ""))

        def on_finish(gen: Generation) -> None:
            self._active = None
            if not gen.prompt_fed:
                return  # interrupted while reading the message: the turn never happened
            closing = self._closing(gen.tokens)
            self._state = gen._state
            self._pending = gen.unfed_tokens + closing
            self._history += turn + gen.tokens + closing

        self._active = Generation(
            self.model, self._pending + turn, max_tokens=self.max_reply_tokens, params=self.params,
            stop=(TURN_SEPARATOR,), state=self._state, rng=self._rng, ban_end_of_text=True,
            penalty_exempt_text=None, on_finish=on_finish)
        return self._active

    def ask(self, message: str) -> str:
        """reply() without streaming: the whole reply, stripped."""
        gen = self.reply(message)
        try:
            return "".join(gen).strip()
        finally:
            gen.close()

    def save_state(self, path) -> None:
        """Save the model state at the end of the transcript (e.g. to resume the chat later with load_state)."""
        self._close_active()
        if self._pending:
            _, self._state = self.model.forward(self._pending, self._state)
            self._pending = []
        if self._state is None:
            raise GenerationError("nothing to save: the chat has not processed any text yet")
        self._state.save(path)

    def load_state(self, state) -> None:
        """Continue from a State, or a file saved by save_state() (or a state-tuned .pth), which must fit this
        model. `history` restarts empty."""
        from rwkv_lite import State
        self._close_active()
        self._state = State.load(state, self.model) if isinstance(state, (str, os.PathLike)) else state.copy()
        self._pending = []
        self._history = []

    def _closing(self, reply_ids: list[int]) -> list[int]:
        """The ids that end the reply's turn with "\\n\\n" (none if the reply already contains it)."""
        text = self.model.tokenizer.decode(reply_ids)
        if TURN_SEPARATOR in text:
            return []
        return self.model.tokenizer.encode("\n" if text.endswith("\n") else TURN_SEPARATOR)

    def _close_active(self) -> None:
        if self._active is not None:
            self._active.close()  # runs its on_finish, which records the (partial) reply
            self._active = None
