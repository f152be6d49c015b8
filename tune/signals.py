"""Signals: SIGINT and SIGTERM stop a running Tune after it saved its state, and the command
exits 130 / 143 with the advice that works from where it stopped (`--resume` or not)."""
from __future__ import annotations

import os
import sys
import signal
import threading
from contextlib import contextmanager


class GracefulStop:
    """SIGINT and SIGTERM during `Tuner.fit` ask Tune to stop after saving its state (Tune's own
    path, reached through SIGUSR1); elsewhere, or on a second signal, they raise KeyboardInterrupt."""

    def __init__(self):
        self.signal: str | None = None
        self.in_fit = False
        self.prog = "tune.search"

    def install(self, prog: str | None = None) -> None:
        self.prog = prog or self.prog
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        first = self.signal is None
        self.signal = self.signal or signal.Signals(signum).name
        if first and self.in_fit and callable(signal.getsignal(signal.SIGUSR1)):
            # os.write, not print: a handler must not re-enter a buffered stream the main code is writing
            os.write(2, f"{self.prog}: {self.signal} received; stopping after Tune saves the experiment state "
                        "(send it again to stop at once)\n".encode())
            self.stop_tune()
            return
        raise KeyboardInterrupt

    def stop_tune(self) -> None:
        """Ask a running `Tuner.fit` to stop after saving its state (Tune's SIGUSR1 handler); no-op outside."""
        if self.in_fit and callable(signal.getsignal(signal.SIGUSR1)):
            signal.raise_signal(signal.SIGUSR1)

    @contextmanager
    def fit(self):
        previous = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # ours forwards both signals
        self.in_fit = True
        try:
            yield
        finally:
            self.in_fit = False
            if previous is None:
                os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
            else:
                os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = previous
            if hasattr(signal, "SIGUSR1") and threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGUSR1, signal.SIG_DFL)  # Tune leaves its handler behind


STOP = GracefulStop()


class Interrupted(KeyboardInterrupt):
    """A stop by signal, carrying the advice that works from where the search stopped."""

    def __init__(self, advice: str):
        super().__init__(advice)
        self.advice = advice


def resume_advice(tune_path: str, folder_left: bool, restarts_on_resume: bool = False) -> str:
    """What to rerun after an interrupt: --resume once Tune saved a state; before that, the command
    without --resume (which then refuses nothing), unless --resume also restarts an unsaved run
    (`restarts_on_resume`: the ablation sweeps, whose session ledger records that one was started).
    `folder_left`: a local experiment folder exists that a run without --resume would refuse."""
    from ray import tune

    if tune.Tuner.can_restore(tune_path):
        return "finished trials are saved, rerun the same command with --resume to finish the others"
    if restarts_on_resume:
        return "no trial was saved yet (finished zoo models are kept); rerun the same command with --resume (it starts the grid again)"
    if folder_left:
        return f"nothing was saved to resume; delete '{tune_path}' and rerun the same command without --resume"
    return "no trial was saved yet (finished zoo models are kept); rerun the same command without --resume"


def interrupted_exit(prog: str, exc: KeyboardInterrupt) -> int:
    """Print the advice an `Interrupted` carries (the command that works from where it stopped);
    the exit code is 128 + the signal's number, as a shell reports a process a signal stopped."""
    name = STOP.signal or "SIGINT"
    advice = getattr(exc, "advice", "rerun the same command with --resume to finish the others")
    print(f"{prog}: interrupted ({name}); {advice}", file=sys.stderr)
    return 128 + signal.Signals[name].value


def run_command(prog: str, run) -> int:
    """A command's exit code: 0; 2 with one line `<prog>: error: ...` for a DsdmError; 128 + the
    signal's number with the advice that resumes, for an interrupt. SIGINT and SIGTERM stop a
    running Tune after it saved its state (the handler names the command by its module)."""
    from dsdm.errors import DsdmError

    STOP.install(prog.split()[-1])
    try:
        run()
    except DsdmError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        return interrupted_exit(prog, exc)
    return 0
