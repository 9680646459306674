"""dlzo.training.interrupt: SIGTERM or Ctrl-C asks the run to stop; the step in flight finishes, the run saves
and stops, and --resume ends where an uninterrupted run ends. During the setup a signal stops at once."""

import os
import signal
import threading

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import small_run
from dlzo.training.config import TrainConfig
from dlzo.training.interrupt import Interrupted, StopNow, StopRequests
from dlzo.training.loop import Session, train


def test_a_signal_is_recorded_and_the_handlers_are_put_back():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with StopRequests().installed() as stop:
        assert not stop and stop.signal is None
        os.kill(os.getpid(), signal.SIGTERM)  # delivered to the main thread, handled at once
        assert stop and stop.signal == "SIGTERM"
    assert {s: signal.getsignal(s) for s in before} == before


def test_during_the_setup_a_signal_stops_at_once_past_any_catch_all():
    with StopRequests().installed() as stop:
        stop.at_once = True
        with pytest.raises(StopNow, match="SIGTERM"):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
            except Exception:  # a loader's catch-all must not swallow the stop
                pytest.fail("StopNow was caught as an Exception")


def test_a_second_ctrl_c_stops_now():
    with StopRequests().installed() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signal == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_outside_the_main_thread_no_handler_is_installed():
    seen = []

    def worker():
        with StopRequests().installed() as stop:
            seen.append((stop.signal, signal.getsignal(signal.SIGTERM)))

    before = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [(None, before)]


@pytest.mark.requires_shared
def test_sigterm_lets_the_step_finish_then_the_run_saves_stops_and_resumes_exactly(tmp_path, monkeypatch):
    """SIGTERM arrives in the middle of step 2: step 2 still ends (logged, in the checkpoint), no step 3 begins,
    the run raises Interrupted naming the resume command; the resumed run ends with an uninterrupted run's
    tensors and log."""
    options = small_run(num_train=32, num_dev=8, num_test=8, steps=6, eval_every=0, scope="layer:1")
    trained, original = [], Session.train_step

    def signalled(self, step, lr):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler only records it: the step goes on
        result = original(self, step, lr)
        trained.append(step)
        return result

    monkeypatch.setattr(Session, "train_step", signalled)
    stopped = tmp_path / "stopped"
    with pytest.raises(Interrupted, match=f"after step 3 of 6 .*continue with: dlzo train --resume {stopped}"):
        train(TrainConfig(**options, out=str(stopped)))
    assert trained == [0, 1, 2]
    assert len((stopped / "trajectory.jsonl").read_text().splitlines()) == 3
    with safe_open(str(stopped / "last.safetensors"), "pt") as handle:
        assert int(handle.metadata()["step"]) == 3
    assert not (stopped / "final.safetensors").exists()
    monkeypatch.setattr(Session, "train_step", original)
    train(TrainConfig(**options, out=str(stopped), resume=str(stopped)))
    train(TrainConfig(**options, out=str(tmp_path / "whole")))
    a, b = load_file(stopped / "final.safetensors"), load_file(tmp_path / "whole" / "final.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert (stopped / "trajectory.jsonl").read_text() == (tmp_path / "whole" / "trajectory.jsonl").read_text()
