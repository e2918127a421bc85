"""torchrun for ``playattention train --nproc N``: it dies with its parent, and a signal ends it cleanly.

``python -m toolkit.launch ARGS`` is ``python -m torch.distributed.run ARGS`` with two changes:

- it asks Linux to send it SIGTERM when the ``playattention`` process that started it dies, even by
  ``kill -9`` (``prctl(PR_SET_PDEATHSIG)``), and the ranks it starts ask the same of it
  (:func:`die_with_parent` in ``cmd_train``), so no rank goes on training as an orphan. SIGTERM,
  not SIGKILL: torchrun passes it on and the ranks finish the step and save a checkpoint first;
- a SIGINT or SIGTERM ends it with status 128 + the signal and without torchrun's traceback of its
  own ``SignalException``: the ranks say what happened (``rank 0: SIGTERM: finishing this step...``).

Elsewhere than Linux the first is skipped (the ranks then outlive a ``kill -9`` of the parent).
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys

#: the launcher's pid, for the ranks (their parent): a rank started after it died stops at once
LAUNCHER_PID = "PLAYATTENTION_LAUNCHER_PID"
#: the playattention process's pid, for the launcher (its parent)
PARENT_PID = "PLAYATTENTION_PARENT_PID"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent: int | None, signum: int = signal.SIGTERM) -> bool:
    """Have the kernel send ``signum`` to this process when its parent exits (Linux); True if set.

    ``parent`` is the pid the parent had: if it is gone already (this process was adopted before it
    could ask), the signal is sent now.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if parent is not None and os.getppid() != parent:  # the parent died before the prctl
        os.kill(os.getpid(), signum)
    return True


def _pid(name: str) -> int | None:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else None


def main(argv: list[str] | None = None) -> int:
    die_with_parent(_pid(PARENT_PID))
    os.environ[LAUNCHER_PID] = str(os.getpid())  # the ranks inherit it
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    # torchrun's warnings as it passes a signal on ("Received Signals.SIGTERM death signal, shutting
    # down workers", "Sending process N closing signal") repeat what the ranks say; errors still show
    for name in list(logging.root.manager.loggerDict):  # each sets its own level (LOGLEVEL), so each is set
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.ERROR)
    try:
        torchrun(argv)
    except SignalException as exc:
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:  # the rank said why; its status is the launch's (2: a problem to fix)
        # torchrun stops the others with SIGTERM once one dies: the one that died first is the news
        killed = sorted((-f.exitcode == signal.SIGTERM, f.timestamp, rank, f.pid, -f.exitcode)
                        for rank, f in exc.failures.items() if f.exitcode < 0)
        if killed:  # a rank that died by a signal said nothing: say which, and how to go on
            *_, rank, pid, signum = killed[0]
            print(f"error: rank {rank} (pid {pid}) was killed by {_signal_name(signum)}; the other ranks were stopped. "
                  f"{_resume_hint(argv or sys.argv[1:])}", file=sys.stderr)
            return 128 + signum
        _, failure = exc.get_first_failure()
        return failure.exitcode if 0 < failure.exitcode < 256 else 1
    return 0


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _resume_hint(argv: list[str]) -> str:
    """How to continue the run ``playattention train`` started with these torchrun arguments."""
    run_dir = argv[argv.index("--run-dir") + 1] if "--run-dir" in argv[:-1] else None
    if run_dir is None:
        return "Resume it from its newest checkpoint with playattention train --resume RUN_DIR"
    return f"Resume it from its newest checkpoint: playattention train --resume {run_dir} --nproc N"


if __name__ == "__main__":
    sys.exit(main())
