"""What a person watching a training sees: a progress bar on a terminal, plain lines in a log file."""
from __future__ import annotations

import sys

from tqdm.auto import tqdm


def shows_a_bar() -> bool:
    """A terminal or a notebook (tqdm.auto's widget); log files get plain lines instead of bar frames."""
    return sys.stderr.isatty() or "ipykernel" in sys.modules


class Progress:
    """Rank 0's bar (or plain lines every ``log_interval`` steps) and messages above it."""

    def __init__(self, *, enabled: bool, total: int, initial: int, title: str, log_interval: int):
        self.enabled, self.total, self.log_interval = enabled, total, log_interval
        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, desc=title, file=sys.stderr,
                        disable=not (enabled and shows_a_bar()))
        self.step_times: list[float] = []

    def say(self, message: str) -> None:
        """A line above the progress bar."""
        if self.enabled:
            self.bar.write(message, file=sys.stderr)

    def step(self, step: int, loss: float, lr: float, tokens_per_s: float, mfu: float | None, dt: float) -> None:
        self.step_times.append(dt)
        if not self.enabled:
            return
        self.bar.update(1)
        if step % self.log_interval == 0 or step == 1:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            if self.bar.disable:  # a log file or a scheduler's output: plain lines instead of bar frames
                self.say(self.line(step, loss, lr, tokens_per_s, mfu))

    def line(self, step: int, loss: float, lr: float, tokens_per_s: float, mfu: float | None) -> str:
        """``step 100/2000: loss 2.1234, lr 1.00e-03, 15,000 tokens/s, ETA 1m40s`` (MFU on GPUs)."""
        recent = self.step_times[-20:]
        eta = int((self.total - step) * sum(recent) / len(recent))
        mins, secs = divmod(eta, 60)
        return (f"step {step}/{self.total}: loss {loss:.4f}, lr {lr:.2e}, {tokens_per_s:,.0f} tokens/s"
                + (f", MFU {mfu:.1%}" if mfu is not None else "") + f", ETA {mins}m{secs:02d}s")

    def close(self) -> None:
        self.bar.close()
