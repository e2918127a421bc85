"""Reading a prepared folder back: meta.json, a split's shards memory-mapped, and ``TokenLoader``'s batches."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .shards import FORMAT_VERSION, _read_json, _shards_ok


def read_meta(prepared: str | Path) -> dict:
    """``meta.json`` of a prepared dataset; raises DataError if it is not one."""
    path = Path(prepared) / "meta.json"
    meta = _read_json(path)
    if meta is None:
        raise DataError(f"{prepared}: not a prepared dataset (no readable meta.json); run `playattention prepare`")
    if meta.get("format") != FORMAT_VERSION:
        raise DataError(f"{prepared}: prepared with data format {meta.get('format')}, this version reads "
                        f"{FORMAT_VERSION}; prepare it again")
    return meta


def tokens_in(prepared: str | Path, split: str) -> int:
    """How many tokens the ``split`` of a prepared dataset holds."""
    meta = read_meta(prepared)
    if split not in meta["splits"]:
        raise DataError(f"{prepared}: no split {split!r} (have: {', '.join(meta['splits'])})")
    return int(meta["splits"][split]["tokens"])


def read_split(prepared: str | Path, split: str) -> list[np.ndarray]:
    """The token shards of one split of a prepared dataset, memory-mapped, in order."""
    meta = read_meta(prepared)
    if split not in meta["splits"]:
        raise DataError(f"{prepared}: no split {split!r} (have: {', '.join(meta['splits'])})")
    entries = meta["splits"][split]["shards"]
    if err := _shards_ok(Path(prepared), split, [e["tokens"] for e in entries]):
        raise DataError(f"{prepared}: {err}; prepare it again")
    # plain ndarray views of the maps: slicing a np.memmap costs ~10x more per window
    return [np.asarray(np.memmap(Path(prepared) / e["file"], dtype="<u2", mode="r")) if e["tokens"]
            else np.zeros(0, dtype="<u2") for e in entries]  # numpy cannot map an empty file


class TokenLoader:
    """Batches of (x, y) token windows for one rank, read through np.memmap.

    Each shard of ``n`` tokens is cut into ``n // T - 1`` windows of ``T + 1`` tokens starting at
    ``phase + j*T`` (``T`` = block_size; x is the first T tokens, y the last T), so windows of an
    epoch never overlap. Every epoch draws, from (seed, epoch), a new phase in [0, T) per shard
    (window edges move, as with nanoGPT's random offsets) and a permutation of all windows (batches
    are well mixed). Batch k of the epoch takes permuted positions [k*B*W, (k+1)*B*W) and rank r
    every W-th of them (W = world_size), so ranks read disjoint windows and all ranks have the
    same number of batches per epoch; the few windows left over at an epoch's end are skipped.
    The state (epoch, cursor) is the same on every rank, so one rank's ``state_dict`` resumes all.
    """

    def __init__(self, prepared: str | Path, split: str, batch_size: int, block_size: int, *,
                 rank: int = 0, world_size: int = 1, seed: int = 0):
        if batch_size < 1 or block_size < 1:
            raise ValueError(f"batch_size and block_size must be positive, got {batch_size} and {block_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.prepared, self.split = Path(prepared), split
        self.batch_size, self.block_size = batch_size, block_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        shards = read_split(self.prepared, split)
        self.tokens = sum(len(s) for s in shards)
        T = block_size
        self._shards = [s for s in shards if len(s) // T - 1 > 0]
        counts = np.array([len(s) // T - 1 for s in self._shards], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])  # first window index of each shard
        self.n_windows = int(self._starts[-1])
        self.batches_per_epoch = self.n_windows // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            need = (batch_size * world_size + 1) * T
            raise DataError(
                f"the {split} split of {prepared} has {self.tokens:,} tokens: too few for one batch of "
                f"{batch_size} windows of {T + 1} tokens on each of {world_size} rank(s); that needs at "
                f"least {need:,} tokens in a shard (lower batch size or block size, or add data)"
            )
        self.epoch, self.cursor = 0, 0
        self._plan_epoch: int | None = None

    def _plan(self) -> None:
        """This epoch's window phases and order, drawn from (seed, epoch) only."""
        if self._plan_epoch == self.epoch:
            return
        rng = np.random.default_rng([self.seed % 2**63, self.epoch])
        self._phase = rng.integers(0, self.block_size, size=len(self._shards))
        self._order = rng.permutation(self.n_windows)
        self._plan_epoch = self.epoch

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y), int64 CPU tensors of shape (batch_size, block_size); y is x shifted by one."""
        B, T, W = self.batch_size, self.block_size, self.world_size
        if self.cursor + B * W > self.n_windows:  # epoch done: the next one reorders the windows
            self.epoch, self.cursor = self.epoch + 1, 0
        self._plan()
        windows = self._order[self.cursor + self.rank : self.cursor + B * W : W]
        self.cursor += B * W
        shard = np.searchsorted(self._starts, windows, side="right") - 1
        rows = np.empty((B, T + 1), dtype=np.int64)
        for i, (w, s) in enumerate(zip(windows, shard)):
            start = int(self._phase[s]) + int(w - self._starts[s]) * T
            rows[i] = self._shards[s][start : start + T + 1]
        buf = torch.from_numpy(rows)  # (B, T+1)
        return buf[:, :-1].contiguous(), buf[:, 1:].contiguous()  # (B, T) each

    def reset(self) -> None:
        """Start again from the first batch of epoch 0 (e.g. the same val batches every evaluation)."""
        self.epoch, self.cursor = 0, 0

    def state_dict(self) -> dict:
        """JSON-serialisable position; ``load_state_dict`` of it continues with the very next batch."""
        return {"split": self.split, "epoch": self.epoch, "cursor": self.cursor, "seed": self.seed,
                "block_size": self.block_size, "batch_size": self.batch_size,
                "world_size": self.world_size, "tokens": self.tokens}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; the data, seed and block size must be the ones it came from."""
        for key in ("split", "seed", "block_size", "tokens"):
            if state.get(key) != getattr(self, key):
                raise DataError(f"loader state is for {key} {state.get(key)!r}, this loader has "
                                f"{getattr(self, key)!r}; resuming would not read the same data")
        # the cursor counts windows of all ranks, so a changed batch size or world size goes on
        # from the same place in the epoch
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
