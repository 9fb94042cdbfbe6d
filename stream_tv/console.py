"""The ``stream-tv`` console script: Ctrl-C at any moment is one line and exit 130.

# subtle: the first second of a run is imports (click, then torch inside the command); a
# SIGINT there would print a KeyboardInterrupt traceback, and one that lands where a library
# swallows it would let the run finish with exit 0 as if never interrupted. So: until the
# CLI is imported, SIGINT exits at once; afterwards it raises KeyboardInterrupt as usual (the
# engine then stops its threads and keeps completed shards) and is also recorded, so that a
# run it interrupted never exits 0.
"""

from __future__ import annotations

import os
import signal
import sys

EXIT_INTERRUPTED = 130  # errors.EXIT_INTERRUPTED, without importing anything yet

_interrupted = False


def _exit_now(signum, frame) -> None:  # pragma: no cover - timing dependent
    os.write(2, b"interrupted\n")
    os._exit(EXIT_INTERRUPTED)


def _interrupt(signum, frame) -> None:
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    """Run the CLI (``stream-tv ...``)."""
    main_thread = signal.getsignal(signal.SIGINT) is not None
    if main_thread:
        signal.signal(signal.SIGINT, _exit_now)
    from .cli import cli

    if main_thread:
        signal.signal(signal.SIGINT, _interrupt)
    code: int | str | None = 0
    try:
        try:
            cli.main(args=argv, prog_name="stream-tv")
        except SystemExit as e:
            code = e.code
    except KeyboardInterrupt:  # landed between the command's end and here
        code = EXIT_INTERRUPTED
    finally:
        if main_thread:  # the work is over: a later Ctrl-C changes nothing (nor kills the exit)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    if _interrupted and code in (None, 0, 1):  # 1: click's "Aborted!" while parsing
        sys.stderr.write("interrupted: rerun the same command to resume\n")
        code = EXIT_INTERRUPTED
    sys.exit(code)
