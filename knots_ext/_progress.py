"""A progress line on a terminal for long loops; silent when stderr is not a terminal or when quiet."""

from __future__ import annotations

import sys
import time


def make_progress(quiet: bool):
    show = not quiet and sys.stderr.isatty()

    def progress(items, desc: str):
        items = list(items)
        if not show:
            yield from items
            return
        start, total = time.perf_counter(), len(items)
        for i, item in enumerate(items):
            sys.stderr.write(f"\r{desc}: {i}/{total} ({time.perf_counter() - start:.1f}s)")
            sys.stderr.flush()
            yield item
        sys.stderr.write(f"\r{desc}: {total}/{total} ({time.perf_counter() - start:.1f}s)\n")

    return progress
