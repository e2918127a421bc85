"""Experiment trackers: TensorBoard, Weights & Biases and a CSV file get every metrics.jsonl line.

The run folder hands each ``train`` and ``eval`` line to :class:`Trackers` (rank 0 only), which
passes every number in it to each tracker the recipe's ``[train.trackers]`` turns on, at the line's
own ``step``, named ``<type>/<key>``: ``train/loss``, ``train/lr``, ``train/grad_norm``,
``train/tokens_per_s``, ``train/aux/total``, ``train/attention/<metric>``, ``eval/val_loss``,
``eval/hellaswag/acc_norm``... A null (``grad_norm`` where DeepSpeed computes none) is left out.

Why not DeepSpeed's own ``monitor`` config: it writes only the events DeepSpeed makes itself (train
loss, learning rate, loss scale) against *samples* seen, so our evaluations, auxiliary losses and
component metrics would be missing and its x axis would not be the optimizer step of metrics.jsonl.

On a resume, what was logged after the checkpoint's step is dropped as metrics.jsonl drops it:
TensorBoard hides it (``purge_step``), the CSV file loses those rows, and W&B continues the same
run (its id is kept in ``wandb/run-id``), ignoring steps it has already seen.
"""
from __future__ import annotations

import csv
import math
import uuid
from pathlib import Path

from .recipe import Recipe, TrackersConfig, recipe_to_dict
from .safeio import write_atomically


def numbers(row: dict) -> dict[str, float | int]:
    """``<type>/<key>`` -> value for every finite number of a metrics line but its step."""
    kind = row.get("type")
    return {f"{kind}/{k}": v for k, v in row.items()
            if k not in ("type", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)}


class TensorBoard:
    """Scalars in ``<run>/tensorboard`` (torch.utils.tensorboard, which needs the tensorboard package)."""

    def __init__(self, run_dir: Path, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        purge = resume_step + 1 if resume_step is not None else None  # hide what came after the checkpoint
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge)

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class Wandb:
    """A Weights & Biases run in ``<run>/wandb``; offline mode needs no network."""

    def __init__(self, run_dir: Path, recipe: Recipe, resume_step: int | None):
        import wandb

        cfg = recipe.train.trackers.wandb
        folder = run_dir / "wandb"
        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / "run-id"  # the same W&B run across resumes
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, name=run_dir.name, id=run_id, resume="allow",
                              tags=list(cfg.tags), dir=str(run_dir), mode=cfg.mode, config=recipe_to_dict(recipe),
                              settings=wandb.Settings(console="off", silent=True))

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class CSVFile:
    """``<run>/metrics.csv``: a ``step`` column and one per metric; rewritten when a new metric appears."""

    def __init__(self, run_dir: Path, resume_step: int | None):
        self.path = run_dir / "metrics.csv"
        self.columns: list[str] = ["step"]
        self.rows: list[dict] = []
        if self.path.is_file():
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or ["step"])
                self.rows = [r for r in reader if resume_step is None or int(r["step"]) <= resume_step]
            self._rewrite()

    def log(self, step: int, values: dict[str, float]) -> None:
        row = {"step": step, **values}
        new = [k for k in values if k not in self.columns]
        self.rows.append(row)
        if new:
            self.columns += new
            self._rewrite()
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.columns).writerow(row)

    def _rewrite(self) -> None:
        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, self.columns)
                w.writeheader()
                w.writerows(self.rows)
        write_atomically(self.path, write)

    def close(self) -> None:
        pass


class Trackers:
    """The trackers a recipe turns on; ``log(row)`` hands them a metrics.jsonl line."""

    def __init__(self, trackers: list):
        self.trackers = trackers

    @classmethod
    def open(cls, recipe: Recipe, run_dir: str | Path, resume_step: int | None = None) -> Trackers:
        """Start every tracker of ``recipe.train.trackers`` for the run in ``run_dir``."""
        cfg: TrackersConfig = recipe.train.trackers
        run_dir = Path(run_dir)
        out: list = []
        if cfg.tensorboard:
            out.append(TensorBoard(run_dir, resume_step))
        if cfg.wandb is not None:
            out.append(Wandb(run_dir, recipe, resume_step))
        if cfg.csv:
            out.append(CSVFile(run_dir, resume_step))
        return cls(out)

    def log(self, row: dict) -> None:
        if row.get("type") not in ("train", "eval") or not self.trackers:
            return
        values = numbers(row)
        for tracker in self.trackers:
            tracker.log(int(row["step"]), values)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []
