"""The interactive (or piped) chat loop behind `rwkv-lite chat`: reading lines, /commands, printing replies.

The conversation itself (transcript, state, sampling) is rwkv_lite.generate.ChatSession; this module only does
the terminal side."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from ..errors import RwkvLiteError
from . import common

CHAT_HELP = """\
Commands (type them as a message):
  /reset        forget the conversation (back to the start, preamble included)
  /save FILE    save the conversation's state to FILE
  /load FILE    continue from a state saved with /save (same model)
  /quit         leave (also /exit, Ctrl-D, or Ctrl-C twice at the prompt)
  /help         this list
  //text        send "/text" as a message
Ctrl-C while the model answers stops the answer, not the chat."""


class ChatCommandError(RwkvLiteError):
    """A chat command that cannot be run (unknown command, missing argument)."""


def run_chat(session, *, interactive: bool, verbose: bool, show_thinking: bool) -> None:
    """Read messages (terminal or piped stdin) and answer each until the input ends or /quit."""
    lines = terminal_lines() if interactive else piped_lines()
    for line in lines:
        message = line.strip()
        if not message:
            continue
        try:
            if message.startswith("/") and not message.startswith("//"):
                if not chat_command(session, message):
                    break
                continue
            if message.startswith("//"):
                message = message[1:]
            chat_turn(session, message, interactive, verbose, show_thinking=show_thinking)
        except KeyboardInterrupt:           # between two steps of a turn or a command: drop it, keep chatting
            if not interactive:
                raise
            click.echo("\n(stopped)", err=True)
        except (RwkvLiteError, ValueError) as e:
            if not interactive:
                raise                       # a script should fail loudly
            click.echo(f"error: {e}", err=True)
        except OSError as e:                # /save into a missing folder, ...
            if not interactive:
                raise
            click.echo(f"error: {e.filename + ': ' if e.filename else ''}{e.strerror or e}", err=True)


def terminal_lines():
    """Lines typed at the terminal. Ctrl-C at the prompt asks for confirmation; a second one (or Ctrl-D) ends."""
    interrupted = False
    while True:
        try:
            line = common.read_line("User: ")
        except EOFError:
            click.echo("", err=True)
            return
        except KeyboardInterrupt:
            if interrupted:
                click.echo("", err=True)
                return
            interrupted = True
            click.echo("\n(Ctrl-C again or Ctrl-D to quit)", err=True)
            continue
        except UnicodeDecodeError as e:     # a terminal that does not send what its locale says
            click.echo(f"error: that line is not valid {e.encoding} text", err=True)
            continue
        interrupted = False
        yield line


def piped_lines():
    """Lines of piped stdin, one message each, decoded as UTF-8 (one line naming the line if it is not)."""
    for number, raw in enumerate(sys.stdin.buffer, start=1):
        yield common.decode_utf8(raw.rstrip(b"\r\n"), f"stdin line {number}")


def chat_command(session, message: str) -> bool:
    """Run a /command; returns False when the chat should end."""
    name, _, arg = message.partition(" ")
    arg = arg.strip()
    name = name.lower()
    if name in ("/quit", "/exit", "/q"):
        return False
    if name == "/help":
        click.echo(CHAT_HELP, err=True)
    elif name == "/reset":
        session.reset()
        click.echo("(conversation reset)", err=True)
    elif name in ("/save", "/load"):
        if not arg:
            raise ChatCommandError(f"{name} needs a file name, e.g. {name} chat.state")
        target = Path(arg).expanduser()
        if name == "/save":
            session.save_state(target)
            click.echo(f"(state saved to {target})", err=True)
        else:
            session.load_state(target)
            click.echo(f"(state loaded from {target})", err=True)
    else:
        raise ChatCommandError(f"unknown command {name} (/help lists the commands; //text sends \"/text\")")
    return True


class ReplyPrinter:
    """Prints a streamed reply without its leading and trailing whitespace (held back until more text comes)."""

    def __init__(self):
        self.started = False
        self.pending_space = ""

    def push(self, piece: str) -> None:
        if not self.started:
            piece = piece.lstrip()
            if not piece:
                return
            self.started = True
        piece = self.pending_space + piece
        shown = piece.rstrip()
        self.pending_space = piece[len(shown):]
        common.write(shown)


def chat_turn(session, message: str, interactive: bool, verbose: bool, show_thinking: bool = True) -> None:
    """Send one message and print the reply as it streams (reasoning first in think mode, unless hidden)."""
    from ..generate import ThinkingSplitter
    gen = session.reply(message)
    printer = ReplyPrinter()
    splitter = ThinkingSplitter() if session.think else None
    if interactive:
        common.write("Assistant: ")
    if splitter is not None and show_thinking:
        common.write("<think")

    answering = []

    def show(parts):
        for kind, text in parts:
            if kind == "answer":
                if show_thinking and not answering:
                    answering.append(True)
                    common.write("\n")           # the answer starts on its own line, after the shown reasoning
                printer.push(text)
            elif show_thinking:
                common.write(text)
    try:
        for piece in gen:
            if splitter is None:
                printer.push(piece)
            else:
                show(splitter.push(piece))
        if splitter is not None:
            show(splitter.flush())
    except KeyboardInterrupt:
        gen.close()                 # the partial reply stays in the conversation, closed as a finished turn
        if not interactive:
            raise
        common.write("\n")
        click.echo("(answer stopped)", err=True)
        common.write("\n")
    else:
        common.write("\n\n")
    if verbose:
        s = gen.stats
        click.echo(f"({s.prompt_tokens} tokens read at {s.prompt_tokens_per_second:.1f}/s, {s.generated_tokens} "
                   f"generated at {s.generation_tokens_per_second:.1f}/s, stopped by {s.stop_reason})", err=True)
