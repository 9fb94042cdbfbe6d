"""Writing a PEFT adapter directory in bounded memory: tensors spooled as they are made, one
``adapter_model.safetensors`` assembled at the end, ``adapter_config.json`` last.

``extract-lora`` makes its tensors one at a time (a tensor's LoRA factors exist only once all
its passes are done, its rank is known only then), and an adapter of a 70B model can hold
gigabytes of factors. So nothing is kept in memory: every tensor's bytes are appended to a
spool file in the output directory's ``.stream-tv/`` as soon as they exist (factors from the
task's ``finish``, tensors saved whole through the engine's writer thread, as a
:class:`~stream_tv.engine.Sink`), and :meth:`AdapterOutput.finish` writes the safetensors
header (every shape is known by then) and copies the spooled bytes behind it, 8 MiB at a
time. Peak disk use is twice the adapter; the spool is removed at the end.

The output directory's rules are the shard writer's (:mod:`stream_tv.io.outdir`): no link
is followed, one run at a time (``.stream-tv/lock``), files appear by rename. While a run is
going, ``.stream-tv/state.json`` marks the directory unfinished, so ``Adapter.load`` refuses
it; an interrupted run leaves no adapter file, and a rerun starts over (a randomized SVD
cannot resume mid-tensor). A finished adapter is replaced only with ``--overwrite``:
``adapter_config.json`` is removed first, so nothing looks finished while the new one is
written.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import DiskError, OutputError
from ..io.outdir import STATE_DIR, STATE_FILE, OutputDir, is_leftover
from ..io.specs import dtype_name
from ..io.writer import OutTensor
from ..units import format_size
from .adapter import WEIGHTS_NAME
from .config import CONFIG_NAME

SPOOL_NAME = "extract-lora.spool"
OPERATION = "extract-lora"
COPY_BYTES = 8 << 20
OURS = (CONFIG_NAME, WEIGHTS_NAME)
# read back at the end; never through a link
_SPOOL_FLAGS = (
    os.O_RDWR | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
)

# build(stats) -> (layout: adapter key -> spooled name, config, safetensors metadata)
Build = Callable[[Any], tuple[Mapping[str, str], Mapping[str, Any], Mapping[str, str]]]


@dataclass
class _Spooled:
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # in the spool
    nbytes: int


class AdapterOutput:
    """One adapter directory being written: ``begin``, then ``write`` / ``put`` tensors in any
    order (each tensor's bytes in order), then ``finish``; ``abort`` on failure.

    ``expected``: the tensors that arrive through :meth:`write` (the engine's sink calls),
    so their spool space is known at their first bytes. ``estimate``: bytes of the adapter at
    most, for the free-space check. ``build`` turns the run's statistics into the file's
    layout, ``adapter_config.json`` and the safetensors metadata.
    """

    def __init__(
        self,
        path: Path,
        build: Build,
        *,
        expected: Sequence[OutTensor] = (),
        estimate: int = 0,
    ):
        self.path = Path(path)
        self.dir = OutputDir(self.path)
        self._build = build
        self._expected = {t.name: t for t in expected}
        self._estimate = estimate
        self._spooled: dict[str, _Spooled] = {}
        self._end = 0
        self._fd: int | None = None
        self._lock = threading.Lock()
        self.bytes_written = 0  # of adapter_model.safetensors, once finished
        self.config: dict[str, Any] | None = None  # adapter_config.json, once finished

    # ---- the directory ----------------------------------------------------------------------

    def begin(self, options) -> None:
        """Check and prepare the directory (refusing what is not ours to replace), open the
        spool; options: ``overwrite``, ``restart``, ``space_check``, ``fsync``."""
        self._fsync = bool(options.fsync)
        try:
            self._prepare(options)
            if options.space_check:
                self._check_space()
            self._fd = os.open(self.dir.state_dir / SPOOL_NAME, _SPOOL_FLAGS, 0o600)
        except OSError as e:
            self.dir.unlock()
            raise self.dir.disk_error(e, "preparing the output directory") from e
        except BaseException:
            self.dir.unlock()
            raise

    def _prepare(self, options) -> None:
        out, d = self.path, self.dir
        d.claim()  # before reading the journal
        state = _read_state(d.state_dir / STATE_FILE)
        names = [p.name for p in _entries(out)]
        finished = any(n in OURS for n in names)
        others = [n for n in names if n not in OURS and not is_leftover(n)]
        if state is not None and state.get("operation") != OPERATION:
            if not (options.restart or options.overwrite):
                raise OutputError(
                    "output directory holds an unfinished run of another stream-tv command",
                    where=str(out),
                    hint="rerun that command, pass --restart to discard it, or choose another "
                    "directory",
                )
        elif (finished or others) and not options.overwrite:
            what = "an adapter" if finished else f"files ({', '.join(others[:3])})"
            raise OutputError(
                f"output directory already holds {what}",
                where=str(out),
                hint="pass --overwrite to replace it, or choose another directory",
            )
        out.mkdir(parents=True, exist_ok=True)
        d.lock()
        for name in OURS:  # the config first: nothing looks finished from here on
            d.remove(name)
        d.remove_temporaries()
        state = {"operation": OPERATION, "note": "an extract-lora run in progress or interrupted"}
        d.atomic_write(f"{STATE_DIR}/{STATE_FILE}", json.dumps(state).encode())

    def _check_space(self) -> None:
        needed = 2 * self._estimate  # the spool, then the file
        free = shutil.disk_usage(self.path).free
        if needed > free:
            raise DiskError(
                f"not enough free space: the adapter needs up to {format_size(needed)} while "
                f"it is written (its spool, then the file), the file system has "
                f"{format_size(free)} free",
                where=str(self.path),
                hint="free space or choose another output directory; --no-space-check writes "
                "anyway",
            )

    # ---- tensors ------------------------------------------------------------------------------

    def write(self, name: str, offset: int, data: memoryview) -> None:
        """Bytes ``[offset, offset + len(data))`` of an expected tensor (the engine's sink)."""
        with self._lock:
            spooled = self._spooled.get(name)
            if spooled is None:
                t = self._expected[name]
                spooled = self._allocate(name, t.dtype, t.shape, t.nbytes)
        self._pwrite(data, spooled.offset + offset)

    def put(self, name: str, tensor: torch.Tensor) -> None:
        """A whole tensor made by a task (LoRA factors): spooled at once."""
        from ..engine import bytes_of

        t = tensor.detach().to("cpu").contiguous()
        with self._lock:
            spooled = self._allocate(name, t.dtype, tuple(t.shape), t.numel() * t.element_size())
        self._pwrite(bytes_of(t), spooled.offset)

    def _allocate(self, name: str, dtype, shape, nbytes: int) -> _Spooled:
        if name in self._spooled:
            raise AssertionError(f"{name} spooled twice")
        spooled = _Spooled(dtype, tuple(shape), self._end, nbytes)
        self._spooled[name] = spooled
        self._end += nbytes
        return spooled

    def _pwrite(self, data, at: int) -> None:
        if self._fd is None:
            raise AssertionError("AdapterOutput.begin() was not called")
        view = memoryview(data).cast("B")
        try:
            while view:
                n = os.pwrite(self._fd, view, at)
                view, at = view[n:], at + n
        except OSError as e:
            raise self.dir.disk_error(e, "writing the adapter's spool") from e

    @property
    def spooled(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return {k: (s.dtype, s.shape) for k, s in self._spooled.items()}

    # ---- the end ------------------------------------------------------------------------------

    def finish(self, stats) -> None:
        """Assemble ``adapter_model.safetensors`` from the spool, then ``adapter_config.json``,
        then remove the spool and the journal."""
        layout, config, metadata = self._build(stats)
        missing = [k for k, n in layout.items() if n not in self._spooled]
        if missing:
            raise AssertionError(f"adapter tensors never made: {missing[:3]}")
        header, pieces = self._header(layout, metadata)
        try:
            self.dir.replace_with(
                WEIGHTS_NAME, lambda fd, _: self._fill(fd, header, pieces), durable=self._fsync
            )
        except OSError as e:
            raise self.dir.disk_error(e, f"writing {WEIGHTS_NAME}") from e
        self.bytes_written = len(header) + sum(s.nbytes for s in pieces)
        self.config = dict(config)
        text = json.dumps(config, indent=2, sort_keys=True) + "\n"
        self.dir.atomic_write(CONFIG_NAME, text.encode(), durable=self._fsync)
        self._close()
        self.dir.remove(f"{STATE_DIR}/{SPOOL_NAME}")
        self.dir.remove(f"{STATE_DIR}/{STATE_FILE}")
        self.dir.unlock(remove=True)

    def _header(self, layout: Mapping[str, str], metadata: Mapping[str, str]):
        entries: dict[str, Any] = {"__metadata__": {"format": "pt", **metadata}}
        pieces, at = [], 0
        for key in sorted(layout):
            s = self._spooled[layout[key]]
            entries[key] = {
                "dtype": dtype_name(s.dtype),
                "shape": list(s.shape),
                "data_offsets": [at, at + s.nbytes],
            }
            pieces.append(s)
            at += s.nbytes
        text = json.dumps(entries, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        return struct.pack("<Q", len(text)) + text, pieces

    def _fill(self, fd: int, header: bytes, pieces: list[_Spooled]) -> None:
        _write_all(fd, header)
        for s in pieces:
            done = 0
            while done < s.nbytes:
                chunk = os.pread(self._fd, min(COPY_BYTES, s.nbytes - done), s.offset + done)
                if not chunk:
                    raise OSError(5, "the spool is shorter than what was written to it")
                _write_all(fd, chunk)
                done += len(chunk)

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def abort(self) -> None:
        """Drop the spool; the journal stays (the directory is unfinished), the lock goes."""
        self._close()
        self.dir.remove(f"{STATE_DIR}/{SPOOL_NAME}")
        self.dir.unlock()


def _entries(d: Path) -> list[Path]:
    try:
        return sorted(d.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def _read_state(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"operation": "unknown (unreadable journal)"}
    return data if isinstance(data, dict) else {"operation": "unknown"}


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
