"""``python -m stream_tv.cli``: the same as the ``stream-tv`` console script."""

from ..console import main

main()
