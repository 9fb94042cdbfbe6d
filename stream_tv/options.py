"""The options every streaming command shares, validated once, and each command's defaults.

:class:`RunOptions` is the only way options reach a command: the Python API takes
``options=RunOptions(...)`` and the CLI builds one from its shared option bundles. Values
are checked when the object is made, so a typo fails at once, before any file is opened:

>>> RunOptions(chunk_size="64MB").chunk_bytes
64000000
>>> RunOptions(on_nonfinite="erorr")
Traceback (most recent call last):
...
stream_tv.errors.InputError: on_nonfinite 'erorr' is not one of error, warn, ignore

No torch here: the CLI builds options before anything heavy is imported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, get_args

from .errors import InputError
from .units import parse_size

NonFinite = Literal["error", "warn", "ignore"]
NONFINITE_CHOICES: tuple[str, ...] = get_args(NonFinite)

#: What each command does with NaN/Inf in an output chunk unless told otherwise: refuse to
#: write a model that holds them; report them (per tensor) in a task vector or a comparison,
#: where they are a finding, not a failure.
NONFINITE_DEFAULTS: dict[str, NonFinite] = {
    "extract": "warn",
    "apply": "error",
    "merge": "error",
    "lora-delta": "warn",
    "compare": "warn",
    "extract-lora": "error",  # tensors saved whole in an adapter, as a model's
    "verify": "ignore",  # verify counts them itself
    "scan": "ignore",
}

#: ``page_cache`` policies (what they do: io/pagecache.py).
PAGE_CACHE_CHOICES = ("auto", "keep", "drop")

DEFAULT_MAX_SHARD = "5GB"
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


@dataclass(frozen=True)
class RunOptions:
    """Options of a streaming run (the CLI's shared options).

    ``device``: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
    ``chunk_size``: bytes in flight per chunk (``"64MB"`` or an int); ``None`` picks 1/32 of
    the available memory within 8-64 MiB. ``max_shard_size``: the largest output shard.
    ``on_nonfinite``: ``None`` keeps the command's default (:data:`NONFINITE_DEFAULTS`).
    ``restart`` discards an unfinished run in the output directory instead of resuming it;
    ``overwrite`` replaces a finished one. ``space_check`` refuses up front when the output's
    file system lacks the space; ``fsync`` flushes each shard before it is renamed.
    ``page_cache``: ``auto``, ``keep`` or ``drop``: whether pages read from the disk leave
    the page cache once read (:mod:`stream_tv.io.pagecache`; ``auto`` drops when the inputs
    and output exceed the memory available, or where the host takes free pages back).
    ``workers``: processes a statistics job (compare) runs in on CPU, ``None`` to choose
    (:func:`stream_tv.workers.worker_count`: on Linux, one per core the memory allows; one
    while other threads run in this process);
    every figure is the same whatever the count. ``force`` proceeds where our own index
    says an input is the wrong kind (a merged model given as a task vector, an adapter
    merged into a model that already holds it).

    Process-wide effects of a run, both documented here because they outlive the call:
    the engine lowers torch's intra-op thread count by two for the run (the reader and
    writer threads need a core each) and restores it afterwards, also after an error; and
    with ``tune_malloc`` (the default) it raises glibc's mmap and trim thresholds once per
    process so freed chunk temporaries are reused instead of faulted in again (a third of a
    merge's time otherwise). glibc cannot be told to go back to its dynamic thresholds, so
    pass ``tune_malloc=False`` to leave the allocator alone.
    """

    device: str = "auto"
    chunk_size: int | str | None = None
    max_shard_size: int | str = DEFAULT_MAX_SHARD
    overwrite: bool = False
    restart: bool = False
    progress: bool = True
    on_nonfinite: NonFinite | None = None
    space_check: bool = True
    fsync: bool = False
    force: bool = False
    tune_malloc: bool = True
    page_cache: str = "auto"
    workers: int | None = None
    chunk_bytes: int | None = field(init=False, repr=False, compare=False)
    shard_bytes: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not _DEVICE.match(self.device):
            raise InputError(
                f"unknown device {self.device!r}", hint="use auto, cpu, cuda or cuda:N"
            )
        if self.on_nonfinite is not None and self.on_nonfinite not in NONFINITE_CHOICES:
            raise InputError(
                f"on_nonfinite {self.on_nonfinite!r} is not one of {', '.join(NONFINITE_CHOICES)}"
            )
        if self.page_cache not in PAGE_CACHE_CHOICES:
            raise InputError(
                f"page_cache {self.page_cache!r} is not one of {', '.join(PAGE_CACHE_CHOICES)}"
            )
        if self.workers is not None and (
            isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1
        ):
            raise InputError(f"workers {self.workers!r} is not a whole number of at least 1")
        chunk = None if self.chunk_size is None else _size(self.chunk_size, "chunk size")
        object.__setattr__(self, "chunk_bytes", chunk)
        object.__setattr__(self, "shard_bytes", _size(self.max_shard_size, "max shard size"))

    def nonfinite_for(self, command: str) -> NonFinite:
        """The NaN/Inf policy of ``command`` under these options."""
        return self.on_nonfinite or NONFINITE_DEFAULTS[command]


def _size(value: int | str, what: str) -> int:
    try:
        return parse_size(value)
    except ValueError as e:
        raise InputError(f"{what}: {e}") from None
