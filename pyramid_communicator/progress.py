"""Progress of long runs (push, pull, apply, ``--publish-all``) for an
operator watching a terminal.

Shown on stderr only when it is a terminal and ``--quiet`` was not given:
cron mails and logs keep the one summary line.  The bars are tqdm's
(done/total, rate, time left); a total that is not known (a peer without
``/status.json``) shows done and rate.
"""
from __future__ import annotations

import os
from typing import TextIO

from tqdm import tqdm


class Progress:
    """Makes the bars of one run; ``Progress(None)`` shows nothing."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream

    @classmethod
    def on_terminal(cls, stream: TextIO, quiet: bool = False) -> Progress:
        """Shown on ``stream`` if it is a terminal and not ``quiet``."""
        isatty = getattr(stream, 'isatty', None)
        shown = not quiet and isatty is not None and isatty()
        return cls(stream if shown else None)

    @property
    def shown(self) -> bool:
        """Whether bars are drawn: worth an extra query for a total."""
        return self.stream is not None

    def bar(self, label: str, total: int | None = None, unit: str = 'messages') -> tqdm:
        """A bar to ``update(n)`` and ``close()`` (or use in ``with``); a
        no-op when nothing is shown."""
        columns, lines = _size(self.stream)
        return tqdm(total=total, desc=label, unit=' ' + unit, file=self.stream,
                    disable=self.stream is None, leave=True, ncols=columns, nrows=lines)


def _size(stream: TextIO | None) -> tuple[int | None, int | None]:
    """The terminal's size; 80x24 for one that reports none (a bare pty),
    where tqdm would draw nothing at all."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return None, None
    return size.columns or 80, size.lines or 24


class Totals:
    """Progress told as running totals, ``(label, done, total)`` (how
    :func:`.seeding.publish_all` tells it), drawn as a bar per label."""

    def __init__(self, progress: Progress, unit: str = 'records') -> None:
        self.progress = progress
        self.unit = unit
        self.bars: dict[str, tqdm] = {}

    def __call__(self, label: str, done: int, total: int) -> None:
        bar = self.bars.get(label)
        if bar is None:
            bar = self.bars[label] = self.progress.bar(label, total, self.unit)
        bar.update(done - bar.n)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


#: No progress: what library callers (the server, tests) get.
NO_PROGRESS = Progress(None)
