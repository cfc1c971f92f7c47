"""User-facing errors: the CLI prints their message on one line and exits with code 2."""

import re


class PranceError(Exception):
    """A mistake in the user's input (bad name, missing file, value out of range)."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line errors."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__


_WRAPPED = re.compile(r"^(?:[\w.]+\.)?PranceError: (.+)$", re.M)


def one_line(error: PranceError) -> str:
    """The message of a PranceError on one line. One raised in a DataLoader worker reaches
    the main process wrapped ("Caught PranceError in DataLoader worker process 0. Original
    Traceback ..."): its own message is the last line of that traceback."""
    text = str(error).strip()
    if text.startswith("Caught PranceError"):
        found = _WRAPPED.findall(text)
        if found:
            text = found[-1]
    return " ".join(text.split("\n")).strip() or type(error).__name__
