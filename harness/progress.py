"""Progress bars for long work, shown only on a terminal (logs and CI get no control characters)."""
from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.progress import track

T = TypeVar("T")


def interactive() -> bool:
    return sys.stderr.isatty()


def progress_bar(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    from rich.console import Console

    return iter(track(items, description=description, total=total, disable=not interactive(),
                      console=Console(stderr=True), transient=True))
