"""`rwkv-lite generate`: continue a prompt, streaming the text to stdout."""
from __future__ import annotations

import sys
from dataclasses import asdict, replace
from pathlib import Path

import click

from ..errors import RwkvLiteError
from . import common


@click.command()
@common.model_argument
@click.option("--prompt", "-p", default=None, help="The text to continue.")
@click.option("--file", "-f", "prompt_file", type=click.Path(path_type=Path), default=None,
              help="Read the prompt from a UTF-8 text file.")
@click.option("--prompt-ids", "prompt_ids", default=None, metavar="IDS",
              help='The prompt as token ids, e.g. "34 105 110" (for models without a tokenizer).')
@click.option("--max-tokens", "-n", type=click.IntRange(min=0), default=100, show_default=True,
              help="Generate at most this many tokens.")
@common.sampling_options
@click.option("--stop", "stops", multiple=True, metavar="TEXT",
              help=r"Stop when this text appears (not printed). Repeatable; \n, \t, \\ are understood.")
@click.option("--state", "state_in", type=click.Path(path_type=Path), default=None,
              help="Continue from a state saved with --save-state or chat's /save, or start from a state-tuned "
                   ".pth (blocks.N.att.time_state).")
@click.option("--save-state", "state_out", type=click.Path(path_type=Path), default=None,
              help="Save the state after the prompt and the generated text to this file.")
@common.json_option
@click.option("--verbose", "-v", is_flag=True,
              help="At the end, print tokens/s of the prompt and of generation, and peak memory, to stderr.")
@common.threads_option
@common.old_spelling("--tokens", "prompt_ids", metavar="IDS")
@common.friendly_errors
def generate(model, model_opt, prompt, prompt_file, prompt_ids, max_tokens, temperature, top_p, top_k, min_p,
             presence_penalty, frequency_penalty, penalty_decay, seed, greedy, stops, state_in, state_out,
             as_json, verbose, threads):
    """Continue a prompt, streaming the generated text to stdout.

    The prompt comes from -p, -f FILE, --prompt-ids, or stdin when it is piped. Defaults are the reference's
    sampling settings (temperature 1, top-p 0.85, presence and frequency penalties 0.2, decay 0.996).

    \b
    Examples:
      rwkv-lite generate -p "And God said"                      # the built-in demo model
      rwkv-lite generate eagle-int8.safetensors -p "The Eiffel tower is in" -n 40 --greedy
      rwkv-lite generate eagle-int8.safetensors -f story.txt --temp 0.8 --top-p 0.9 -s 7
      echo "Q: What is 2+2?" | rwkv-lite generate eagle-int8.safetensors --stop '\\n' --json
      rwkv-lite generate tiny.safetensors --prompt-ids "34 105 110" -n 8
    """
    from ..generate import generate as run_generate
    given = [name for name, value in (("-p", prompt), ("-f", prompt_file), ("--prompt-ids", prompt_ids))
             if value is not None]
    if len(given) > 1:
        raise click.UsageError(f"give the prompt one way: {' and '.join(given)} were both given")
    if not given and common.stdin_is_interactive():
        raise click.UsageError("no prompt: give one with -p TEXT or -f FILE, or pipe it on stdin")
    params = common.sampling_params("default", greedy, temperature=temperature, top_p=top_p, top_k=top_k,
                                    min_p=min_p, presence_penalty=presence_penalty,
                                    frequency_penalty=frequency_penalty, penalty_decay=penalty_decay, seed=seed)
    stops = [common.unescape(s) for s in stops]
    if any(not s for s in stops):
        raise click.BadParameter("stop strings cannot be empty", param_hint="--stop")

    path = common.model_path(model, model_opt)
    common.set_threads(threads)
    llm = common.load_model(path)
    if prompt_ids is not None:
        prompt_value = common.parse_ids(prompt_ids, llm.config["vocab_size"])
    elif prompt_file is not None:
        prompt_value = common.read_text_file(prompt_file)
    elif prompt is not None:
        prompt_value = prompt
    else:
        prompt_value = common.read_stdin_text()
    if llm.tokenizer is None and isinstance(prompt_value, str):
        raise RwkvLiteError(f"{path}: this model has no tokenizer, so it cannot read text: give the prompt as "
                            "token ids with --prompt-ids (or convert it again with --vocab)")
    state = common.load_state_for(llm, state_in) if state_in is not None else None

    params = replace(params, max_tokens=max_tokens, stop=tuple(stops))      # (so --json shows them)
    gen = run_generate(llm, prompt_value, params=params, state=state)
    common.utf8_stdout()
    interrupted = False
    try:
        for piece in gen:
            if not as_json:
                common.write(piece)
    except KeyboardInterrupt:
        gen.close()
        interrupted = True
    if not as_json and sys.stdout.isatty() and gen.text and not gen.text.endswith("\n"):
        common.write("\n")        # leave the terminal's prompt on a line of its own (pipes get the exact text)
    if state_out is not None and not interrupted:
        gen.state.save(state_out)
    if as_json:
        common.print_json({
            "model": str(path),
            "prompt": prompt_value if isinstance(prompt_value, str) else None,
            "prompt_ids": None if isinstance(prompt_value, str) else prompt_value,
            "text": gen.text,
            "tokens": gen.tokens,
            "stop_reason": gen.stats.stop_reason,
            "params": {**asdict(params), "banned_tokens": list(params.banned_tokens), "stop": list(params.stop)},
            "stats": common.stats_doc(gen.stats),
        })
    elif verbose:
        common.report_stats(gen.stats)
    if interrupted:
        common.fail("interrupted", 130)
