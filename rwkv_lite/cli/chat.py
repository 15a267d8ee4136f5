"""`rwkv-lite chat`: a conversation in the World chat format (the loop is in chat_loop.py)."""
from __future__ import annotations

from pathlib import Path

import click

from ..errors import RwkvLiteError
from . import chat_loop, common


@click.command()
@common.model_argument
@common.sampling_options
@click.option("--max-tokens", "-n", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Longest reply, in tokens.")
@click.option("--preamble", default=None,
              help="Text read before the first message (default: a short greeting exchange, as in the "
                   "reference chat demo).")
@click.option("--no-preamble", is_flag=True, help="Start from the empty state.")
@click.option("--state", "state_in", type=click.Path(path_type=Path), default=None,
              help="Start from a state saved with /save (like /load FILE as the first command), or from a "
                   "state-tuned .pth (blocks.N.att.time_state).")
@click.option("--think", is_flag=True,
              help="RWKV-7 G1 think mode: start each reply with <think, so the model reasons before it answers.")
@click.option("--hide-thinking", is_flag=True, help="With --think, show only the answer, not the reasoning.")
@click.option("--verbose", "-v", is_flag=True, help="After each reply, print its tokens and tokens/s to stderr.")
@common.threads_option
@common.friendly_errors
def chat(model, model_opt, temperature, top_p, top_k, min_p, presence_penalty, frequency_penalty, penalty_decay,
         seed, greedy, max_tokens, preamble, no_preamble, state_in, think, hide_thinking, verbose, threads):
    """Chat with a model in the World chat format ("User: ...\\n\\nAssistant: ...").

    The model's state is kept between turns, so history is never read twice. Defaults are the reference chat
    demo's settings (temperature 1, top-p 0.3, presence and frequency penalties 0.5, decay 0.996).

    With piped stdin each line is one message (or command) and stdout gets each reply followed by an empty
    line (replies never contain one), so a chat can be scripted.

    RWKV-7 G1 models can think before answering: with --think each reply starts with "<think", the model writes
    its reasoning up to "</think>" and then the answer (--hide-thinking prints only the answer).

    \b
    Commands (type them as a message):
      /reset        forget the conversation
      /save FILE    save the conversation's state
      /load FILE    continue from a saved state
      /quit         leave (also Ctrl-D, or Ctrl-C twice)
      /help         list the commands

    \b
    Examples:
      rwkv-lite chat eagle-int8.safetensors
      rwkv-lite chat eagle-int8.safetensors --seed 1 --temperature 0.7
      printf 'Hi!\\nWhat is the capital of France?\\n/save paris.state\\n' | rwkv-lite chat eagle-int8.safetensors
      rwkv-lite chat eagle-int8.safetensors --state paris.state
      rwkv-lite chat g1-2.9b-int8.safetensors --think --hide-thinking
    """
    from ..generate import DEFAULT_PREAMBLE, ChatSession
    if preamble is not None and no_preamble:
        raise click.UsageError("--preamble and --no-preamble cannot be used together")
    if hide_thinking and not think:
        raise click.UsageError("--hide-thinking needs --think")
    params = common.sampling_params("chat", greedy, temperature=temperature, top_p=top_p, top_k=top_k,
                                    min_p=min_p, presence_penalty=presence_penalty,
                                    frequency_penalty=frequency_penalty, penalty_decay=penalty_decay, seed=seed)
    path = common.model_path(model, model_opt)
    common.set_threads(threads)
    llm = common.load_model(path)
    if llm.tokenizer is None:
        raise RwkvLiteError(f"{path}: this model has no tokenizer, so it cannot chat")
    session = ChatSession(llm, params=params, max_reply_tokens=max_tokens, think=think,
                          preamble="" if no_preamble else (DEFAULT_PREAMBLE if preamble is None else preamble))
    if state_in is not None:
        session.load_state(state_in)        # refused in one line unless it fits this model
    common.utf8_stdout()
    interactive = common.stdin_is_interactive()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        click.echo(f"Chatting with {path.name}. /help lists the commands; /quit or Ctrl-D leaves.", err=True)
    chat_loop.run_chat(session, interactive=interactive, verbose=verbose, show_thinking=not hide_thinking)
