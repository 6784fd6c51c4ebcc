"""Stopping on request: Slurm's pre-emption and time-limit signals (SIGTERM, SIGUSR1; `#SBATCH --signal`) and Ctrl-C
end a run between two engine steps, after the finished results are written, never in the middle of a write or of
a step the other ranks are waiting on.

Rank 0 notes the signal and the engine stops planning, drains the steps in flight and raises Stopped; the other
ranks note it too, keep following rank 0 until its STOP, then exit with the same code (128 + the signal's number).
A second signal while stopping ends the process at once (KeyboardInterrupt).
"""

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Stopped(Exception):
    """The run was asked to stop by a signal."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopRequest:
    """Which stop signal arrived, if any (installed for the whole run)."""

    def __init__(self):
        self.signum: int | None = None

    def install(self) -> "StopRequest":
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._note)
        return self

    def _note(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt  # asked twice: stop now
        self.signum = signum

    def __bool__(self) -> bool:
        return self.signum is not None

    def check(self) -> None:
        if self.signum is not None:
            raise Stopped(self.signum)
