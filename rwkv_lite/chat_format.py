"""OpenAI-style chat messages -> a prompt in the RWKV World chat format.

Shared by the server's chat endpoint and batch jobs' `messages` lines, so that the same messages give the same
prompt ids everywhere. The format: "System: ...\\n\\nUser: ...\\n\\nAssistant: ...\\n\\n...Assistant:", each message's
text normalised as the chat command does (normalize_message), and a reply ends where the model starts the next
user turn (CHAT_STOP).
"""
from __future__ import annotations

from .errors import RwkvLiteError
from .generate import normalize_message

CHAT_STOP = "\n\nUser:"           # a reply ends where the model starts the next user turn
CHAT_REPLY_END = "\n\n"           # ... and the reply, as the next prompt repeats it, ends with the turn separator
# OpenAI roles -> the RWKV World chat format's speaker names ("developer" is OpenAI's newer name for system)
CHAT_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}


class ChatFormatError(RwkvLiteError, ValueError):
    """A `messages` value that is not a list of {"role", "content"} objects this format can express."""


def message_text(content, i: int) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ChatFormatError(f"messages[{i}].content must be a string or a list of text parts (images and audio are "
                          "not supported)")


def chat_prompt_ids(tokenizer, messages) -> tuple[list[int], list[int]]:
    """The prompt ids of a conversation, ending with "Assistant:" (the model writes the space and the reply), and
    the message boundaries (prefix-cache points). Each message is encoded on its own, so a conversation's earlier
    turns are the same ids in every later request. Raises ChatFormatError for a malformed list."""
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError("'messages' must be a non-empty list")
    ids, points = [], []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ChatFormatError(f"messages[{i}] must be an object")
        role = message.get("role")
        speaker = CHAT_ROLES.get(role)
        if speaker is None:
            raise ChatFormatError(f"messages[{i}]: role {role!r} is not supported (system, developer, user, "
                                  "assistant)")
        text = normalize_message(message_text(message.get("content"), i))
        if speaker == "Assistant":          # as the model wrote it: "Assistant:" then " reply\n\n"
            ids += tokenizer.encode("Assistant:")
            ids += tokenizer.encode(f" {text}{CHAT_REPLY_END}")
        else:
            ids += tokenizer.encode(f"{speaker}: {text}{CHAT_REPLY_END}")
        points.append(len(ids))
    ids += tokenizer.encode("Assistant:")
    return ids, points
