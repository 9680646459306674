"""User-facing errors: the CLI prints these as one line and exits with code 2."""


class DlzoError(Exception):
    """A mistake in the user's input (a flag, a file, a model name), not a bug in dlzo."""
