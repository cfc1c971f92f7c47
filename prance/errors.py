"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class PranceError(Exception):
    """A mistake in the user's input (bad name, missing file, value out of range)."""
