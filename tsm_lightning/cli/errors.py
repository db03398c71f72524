"""Errors and messages of the command line: one-line ``error: ...`` and progress on stderr."""

from __future__ import annotations

import re
import sys

__all__ = ["PROG", "CLIError"]

PROG = "tsm-lightning"
_MAX_MESSAGE = 400


class CLIError(Exception):
    """A user mistake: reported as one line ``error: ...`` with exit status 2."""


def _one_line(err: BaseException | str, limit: int = _MAX_MESSAGE) -> str:
    text = err if isinstance(err, str) else (str(err) or type(err).__name__)
    if isinstance(err, KeyError) and err.args:
        text = f"missing key {err.args[0]!r}"
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
