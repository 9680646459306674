"""User-facing errors: the CLI prints these as one line and exits with code 2."""


class DlzoError(Exception):
    """A mistake in the user's input (a flag, a file, a model name), not a bug in dlzo."""


class Diverged(DlzoError):
    """Training stopped because the loss stayed non-finite (--max-nonfinite steps in a row): the rate, eps or
    dtype is wrong for this model. A learning-rate grid counts such a rate as infinitely bad."""


def first_line(err: BaseException) -> str:
    """The first line of an error's message (its class name when the message is empty), for one-line errors."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
