"""Errors and messages of the command line: one-line ``error: ...`` and progress on stderr."""

from __future__ import annotations

import re
import sys

__all__ = ["PROG", "CLIError"]

PROG = "tsm-lightning"
_MAX_MESSAGE = 400


class CLIError(Exception):
    """A user mistake: reported as one line ``error: ...`` with exit status 2."""


_LIBRARY_TO_OPTIONS = (
    ("token_grid=TokenGrid(grid=(h, w), prefix_tokens=P)", "--token-grid HxW --prefix-tokens P"),
    ("token_grid=TokenGrid(grid=(h, w))", "--token-grid HxW"),
    ("or layer= to choose", "or --layer NAME to choose"),
)
"""Library argument names in the package's messages, and the options that set them on the command line."""


def _one_line(err: BaseException | str, limit: int = _MAX_MESSAGE) -> str:
    text = err if isinstance(err, str) else (str(err) or type(err).__name__)
    if isinstance(err, KeyError) and err.args:
        text = f"missing key {err.args[0]!r}"
    for library, option in _LIBRARY_TO_OPTIONS:
        text = text.replace(library, option)
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
