"""``stream-tv``: the command line. Parses options, calls the API, prints; no maths here.

Errors raised by the library become one line on stderr and an exit code (see the README's
"Exit codes"); a traceback appears only for a bug, and only with ``--debug``. Importing
this package imports no torch: ``--help`` is instant, each command imports what it runs.

- :mod:`.base`: the ``stream-tv`` group, error handling, the shared option bundles;
- :mod:`.write`: the commands that write a checkpoint (``extract``, ``merge``, ...) and
  ``inspect``;
- :mod:`.apply`: ``apply`` (task arithmetic, TIES, DARE, ... of task vectors, models, adapters);
- :mod:`.analyse`: ``compare``, ``verify``, ``demo``;
- :mod:`.extract_lora`: ``extract-lora``.
"""

import sys

if sys.argv[:1] == ["-m"]:  # `python -m stream_tv.cli`: Ctrl-C is ours from here on, since
    from ..console import handle_sigint  # this package imports before its __main__ runs

    handle_sigint()

from . import analyse, apply, extract_lora, write  # noqa: E402, F401  (each module registers its commands)
from .base import cli, main  # noqa: E402

__all__ = ["cli", "main"]
