"""Progress bars (tqdm, on stderr) for the merge's passes over the modules: elapsed time, rate and
an estimate of the time left. Off when quiet, and when stderr is not a terminal (logs, CI)."""

from __future__ import annotations

import sys

from tqdm import tqdm


def make_progress(quiet: bool):
    """progress(items, desc) yields the items, with a bar over them unless disabled."""
    disable = quiet or not sys.stderr.isatty()

    def progress(items, desc: str):
        items = list(items)
        yield from tqdm(items, desc=desc, total=len(items), unit="module", file=sys.stderr, disable=disable)

    return progress
