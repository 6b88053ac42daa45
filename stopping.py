"""Stopping a run cleanly: the stop signals, DataLoader workers that leave them to the main
process, and a worker's death as one line instead of a traceback."""

from __future__ import annotations

import contextlib
import signal

from torch.utils.data import DataLoader

from runfolder import RunFolder, has_checkpoint
from utils import UsageError

# Ctrl-C; scancel, a job's end and torchrun passing either on; a closed ssh session; Slurm's
# warning before the time limit (--signal=USR1@SECONDS). Windows has the first two only.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1")
                     if hasattr(signal, name))


class StopRequest:
    """A stop signal asks the loop to stop after the current step and save where it is;
    a second Ctrl-C stops at once. `signum` is the signal's number, 0 without one."""

    def __init__(self):
        self.signum = 0

    def __enter__(self):
        self._old = {}
        try:
            for sig in STOP_SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            pass
        return self

    def _handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = self.signum or signum

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal after saving; the message says how to resume, and the
    exit code is 128 + the signal's number, as a shell reports a process it ended."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader worker's worker_init_fn: a signal to the whole process group (Ctrl-C,
    scancel) is the main process's to handle; a worker it killed would crash the run."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


class Loader(DataLoader):
    """A DataLoader whose workers start with the stop signals blocked (and then ignore them,
    see ignore_stop_signals), so that no signal kills one before it can ignore it."""

    def __iter__(self):
        if not self.num_workers or not hasattr(signal, "pthread_sigmask"):
            return super().__iter__()
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # forked workers inherit it
        try:
            return super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # pending signals arrive here


@contextlib.contextmanager
def worker_deaths(run: RunFolder):
    """A DataLoader worker that dies (killed for memory, mostly) ends the run with one line;
    last.pt stays the last state saved. PyTorch reports it as a RuntimeError from the loader,
    or from its SIGCHLD handler wherever the main process is."""
    try:
        yield
    except RuntimeError as err:
        if "DataLoader worker" not in str(err):
            raise
        saved = (f"{run.checkpoints / 'last.pt'} holds the last state saved: continue with the same "
                 f"command and --resume" if has_checkpoint(run.path) else "nothing was saved yet")
        what = str(err).strip().splitlines()[0].rstrip(". ")[:200]
        raise UsageError(f"{what} (out of memory?); {saved}; fewer --workers or a smaller "
                         f"--batch-size need less memory") from None
