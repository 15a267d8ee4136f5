"""Errors that rwkv-lite reports to users as one clear line (the CLI prints ``str(err)`` and exits 1)."""


class RwkvLiteError(Exception):
    """Base class: the message names the file (if any) and what is wrong, in one line."""


class FormatError(RwkvLiteError):
    """A model, checkpoint, state or vocabulary file is malformed, truncated or unsupported."""


class UnsafeCheckpointError(FormatError):
    """A pickle-based checkpoint asked for something other than tensor storage (refused, nothing executed)."""


class NumericalError(RwkvLiteError):
    """NaN or Inf appeared in the forward pass."""


class ResourceError(RwkvLiteError):
    """The machine cannot run this (e.g. the model does not fit in memory)."""
