"""The ``stream-tv`` console script: Ctrl-C at any moment is one line and exit 130.

# subtle: the first second of a run is imports (click, then torch inside the command); a
# KeyboardInterrupt there prints a traceback, or aborts the process when it lands in Python
# code torch's C++ called; one that a library swallows lets the run finish with exit 0. So
# SIGINT never raises: while the engine streams it asks it to stop at the next chunk (the
# engine then ends as on a Ctrl-C: completed shards kept, a message on how to resume); at any
# other moment there is nothing to keep, and the process exits at once with 130. A second
# Ctrl-C always exits at once. An interrupted run never exits 0.
"""

from __future__ import annotations

import gc
import os
import signal
import sys

from . import collector

EXIT_INTERRUPTED = 130  # errors.EXIT_INTERRUPTED, without importing anything yet

_interrupted = False


def _on_sigint(signum, frame) -> None:
    """Ctrl-C: stop a streaming run at its next chunk (it keeps completed shards and says how
    to resume); at any other moment (imports, planning, a download), exit at once.

    # subtle: this handler never raises. A KeyboardInterrupt raised at an arbitrary
    # bytecode can land in Python code that C++ called (torch's import, a pybind11
    # callback), where it aborts the process ("terminate called after throwing ...").
    """
    global _interrupted
    first = not _interrupted
    _interrupted = True
    engine = sys.modules.get("stream_tv.engine")
    if first and engine is not None and engine.running():
        engine.request_stop()
        return
    os.write(2, b"interrupted: rerun the same command to resume\n")
    os._exit(EXIT_INTERRUPTED)


def handle_sigint() -> bool:
    """Install the CLI's Ctrl-C handler (main thread only); whether it was installed."""
    if signal.getsignal(signal.SIGINT) is None:  # not the main thread's interpreter
        return False
    try:
        signal.signal(signal.SIGINT, _on_sigint)
    except ValueError:  # not called from the main thread
        return False
    return True


def main(argv: list[str] | None = None) -> None:
    """Run the CLI (``stream-tv ...``)."""
    # subtle: numpy's and scipy's OpenBLAS start one pool thread per core, which spins for a
    # while before it sleeps; on 2 cores those threads took 2.3% of compare's wall (while
    # torch imports, and in each worker, where numba loads scipy). stream-tv makes no BLAS
    # call through numpy or scipy (torch has its own), so the CLI's process starts none; a
    # value the user set is kept.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    collector.pause_for_startup()
    main_thread = handle_sigint()
    from .cli import cli

    code: int | str | None = 0
    try:
        cli.main(args=argv, prog_name="stream-tv")
    except SystemExit as e:
        code = e.code
    finally:
        if main_thread:  # the work is over: a later Ctrl-C changes nothing (nor kills the exit)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    if _interrupted and code in (None, 0, 1):  # 1: click's "Aborted!" while parsing
        sys.stderr.write("interrupted: rerun the same command to resume\n")
        code = EXIT_INTERRUPTED
    # subtle: the interpreter's last collection walks every object torch (and numba) made,
    # 0.2 s of the 0.3 s a process that imported torch spends exiting (measured on this
    # project's machines). The work is done and every output closed; what remains is only
    # freed memory, so the collector is told to leave it (atexit handlers and the flush of
    # stdout and stderr still run).
    gc.freeze()
    sys.exit(code)
