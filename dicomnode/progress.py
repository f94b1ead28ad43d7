"""Progress bars for the long commands (eval, bench, send of a folder): tqdm on stderr.

Shown only when stderr is a terminal: a log file, a pipe or journald gets no carriage returns
and no bar, and the commands' results on stdout are never mixed with one.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TypeVar

from tqdm import tqdm

Item = TypeVar("Item")


def progress(items: Iterable[Item], *, description: str, unit: str, total: int | None = None) -> tqdm:
    """`items`, with a bar that counts them in `unit`s when stderr is a terminal."""
    return tqdm(
        items,
        total=total,
        desc=description,
        unit=unit,
        file=sys.stderr,
        disable=not sys.stderr.isatty(),
        dynamic_ncols=True,
        leave=False,
    )
