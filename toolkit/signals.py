"""Stopping on SIGINT/SIGTERM: finish the step, save, leave; every rank at the same step."""
from __future__ import annotations

import contextlib
import signal
import sys
import threading

import torch
import torch.distributed as dist


class StopSignals:
    """While fitting, SIGINT/SIGTERM ask for a stop after the current step; a second one acts at once."""

    def __init__(self, rank: int = 0, world_size: int = 1, device: torch.device | None = None):
        self.rank, self.world_size, self.device = rank, world_size, device or torch.device("cpu")
        self.received = 0  # the signal this rank got (the handler sets it; never cleared)

    @contextlib.contextmanager
    def catching(self):
        """Handlers for SIGINT and SIGTERM while inside (main thread only); the previous ones after."""
        if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
            yield
            return
        previous = {s: signal.getsignal(s) or signal.SIG_DFL for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, _frame):
            self.received = signum
            for s, h in previous.items():
                signal.signal(s, h)
            who = f"rank {self.rank}: " if self.world_size > 1 else ""
            sys.stderr.write(f"\n{who}{signal.Signals(signum).name}: finishing this step, then saving a "
                             f"checkpoint and stopping (send it again to stop at once, unsaved)\n")

        for s in previous:
            signal.signal(s, handler)
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def stop_requested(self) -> bool:
        """Whether any rank got SIGINT/SIGTERM; every rank gets the same answer (one int, all-reduced)."""
        signum = self.received
        if self.world_size > 1:
            flag = torch.tensor([signum], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            signum = int(flag.item())
        # only ever set, never cleared: a signal that lands during the all-reduce (its handler runs
        # as the collective returns) is in self.received but not in signum; the next step stops
        if signum:
            self.received = signum
        return signum != 0
