"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class PranceError(Exception):
    """A mistake in the user's input (bad name, missing file, value out of range)."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line errors."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__
