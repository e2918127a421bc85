"""DeepSpeed checkpoints of a run (``run_dir/checkpoints/step-NNNNNNN``) and the consolidated export.

A checkpoint is DeepSpeed's own (module, optimizer and ZeRO partitions, scheduler) plus a
``client_state`` with the step, the tokens seen and every rank's data-loader state. The export
(:func:`export_weights`) is one ``model.safetensors`` of fp32 weights under the model's GPT-2
parameter names, readable without DeepSpeed.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

TAG_RE = re.compile(r"^step-(\d+)$")
WEIGHTS = "model.safetensors"


def tag_for(step: int) -> str:
    return f"step-{step:07d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoint folders under ``root``, oldest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := TAG_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def save(engine, root: str | Path, step: int, client_state: dict, keep: int | None = None) -> Path:
    """Save a DeepSpeed checkpoint for ``step`` (every rank must call); rank 0 then keeps the newest ``keep``."""
    import torch.distributed as dist

    root = Path(root)
    tag = tag_for(step)
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state)
    if keep is not None and dist.get_rank() == 0:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return root / tag


def load(engine, root: str | Path, tag: str | None = None) -> dict:
    """Load the checkpoint ``tag`` (default: the newest) into ``engine``; returns its client_state."""
    root = Path(root)
    if tag is None:
        found = list_checkpoints(root)
        if not found:
            raise FileNotFoundError(f"{root}: no checkpoints (step-NNNNNNN folders)")
        tag = found[-1].name
    path, client_state = engine.load_checkpoint(str(root), tag=tag)
    if path is None:
        raise FileNotFoundError(f"{root / tag}: not a loadable DeepSpeed checkpoint")
    return client_state


def exportable(state: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """The tensors to write: contiguous, and a tied LM head stored once (as transformer.wte.weight)."""
    out = {k: v.contiguous() for k, v in state.items()}
    if tied:
        out.pop("lm_head.weight", None)
    return out


def export_weights(state: dict[str, torch.Tensor], path: str | Path, tied: bool, metadata: dict | None = None) -> Path:
    """Write fp32 weights to a safetensors file."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(exportable(state, tied), str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    tmp.replace(path)
    return path


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load an exported ``model.safetensors`` into ``model``; a tied head may be absent, nothing else."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches: keep the first line that names a tensor
        lines = [ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln] or [str(exc).splitlines()[0]]
        raise ValueError(f"{path}: weights do not match the model ({lines[0]})") from None
    allowed = {"lm_head.weight"} if getattr(model.config, "tie_embeddings", False) else set()
    missing = [k for k in missing if k not in allowed]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
        raise ValueError(f"{path}: weights do not match the model ({'; '.join(parts)})")
