"""``python -m stream_tv.cli``: the same as the ``stream-tv`` console script."""

from .base import main

main()
