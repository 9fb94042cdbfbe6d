"""One exception family. Every message says what went wrong, where, and how to fix it.

Library code raises these; only ``cli.py`` turns them into a message and an exit code.

>>> try:
...     raise InputError("no safetensors files", where="/models/x", hint="check the path")
... except StreamTVError as e:
...     print(e)
/models/x: no safetensors files (check the path)
"""

from __future__ import annotations

# Exit codes, documented in the README ("Exit codes").
EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_VERIFY_FAILED = 3
EXIT_IO = 4
EXIT_INTERRUPTED = 130


class StreamTVError(Exception):
    """Base class of every error stream_tv raises on purpose."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None):
        self.message = message
        self.where = where
        self.hint = hint
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        if self.hint:
            text += f" ({self.hint})"
        return text


class InputError(StreamTVError):
    """An input (model reference, checkpoint, adapter, option) cannot be used as given."""


class ReferenceNotFoundError(InputError):
    """A model reference does not resolve to safetensors files."""


class CorruptCheckpointError(InputError):
    """A safetensors file or index is malformed, truncated or inconsistent."""


class MismatchError(InputError):
    """Two inputs that must agree (keys, shapes, dtypes) do not."""


class AdapterError(InputError):
    """A PEFT adapter is malformed, unsupported, or does not fit its base."""


class ModelDefinitionError(InputError):
    """The base has a ``config.json`` but its ``transformers`` class cannot be built."""


class OutputError(StreamTVError):
    """The output location cannot be used (exists, inside an input, locked)."""


class DiskError(StreamTVError):
    """Writing the output failed (disk full, permission denied)."""

    exit_code = EXIT_IO


class NonFiniteError(StreamTVError):
    """A NaN or Inf was found where ``--on-nonfinite error`` forbids it."""


class VerificationError(StreamTVError):
    """An output directory is incomplete, corrupt, or differs from a recomputation."""

    exit_code = EXIT_VERIFY_FAILED


class Interrupted(StreamTVError):
    """The run was interrupted (Ctrl-C); completed shards are kept for resume."""

    exit_code = EXIT_INTERRUPTED


class WorkerError(StreamTVError):
    """A worker process (``--workers``) ended without a result: killed for memory, or by a
    signal."""

    exit_code = EXIT_INTERNAL


class InternalError(AssertionError):
    """An invariant of stream_tv itself does not hold: a bug, never the user's input.

    Deliberately not a :class:`StreamTVError`: the CLI reports it as an internal error
    (exit 1, traceback with ``--debug``), not as bad input (exit 2).
    """


def invariant(condition: object, message: str) -> None:
    """Raise :class:`InternalError` unless ``condition`` holds.

    >>> invariant(1 + 1 == 2, "arithmetic")
    >>> invariant(False, "rows out of order")
    Traceback (most recent call last):
    ...
    stream_tv.errors.InternalError: rows out of order
    """
    if not condition:
        raise InternalError(message)
