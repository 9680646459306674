"""Stopping a run cleanly: SIGTERM and Ctrl-C let the current step finish, then the trainer saves and exits;
during the setup before the first step (loading, the frozen prefix, the first dev loss) they stop at once."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

from dlzo.errors import DlzoError


class Interrupted(DlzoError):
    """The run stopped on a signal after saving; the CLI exits with 130."""


class StopNow(BaseException):
    """Raised by the handler while `at_once` is set. Not an Exception, so no `except Exception` on the way
    (a model loader's, a GGUF conversion's) takes it for an error and goes on; the trainer turns it into
    Interrupted."""


class StopRequests:
    """Set by SIGTERM or SIGINT; the trainer checks it between steps. A second Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self.at_once = False  # while set (a run's setup: nothing to save yet), a signal raises StopNow

    def __bool__(self) -> bool:
        return self.signal is not None

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequests]:
        def request(number, _frame):
            if self.signal is not None and number == signal.SIGINT:
                raise KeyboardInterrupt  # asked twice: stop now (the last finished step is in the trajectory)
            self.signal = signal.Signals(number).name
            if self.at_once:
                raise StopNow(self.signal)

        try:
            previous = {s: signal.signal(s, request) for s in (signal.SIGTERM, signal.SIGINT)}
        except ValueError:  # not the main thread (e.g. a notebook worker): no handlers, plain behaviour
            yield self
            return
        try:
            yield self
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
