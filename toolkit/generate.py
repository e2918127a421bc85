"""Sampling text from a model, and loading a finished run without DeepSpeed.

A run folder holds ``recipe.toml`` (the resolved recipe), ``model.safetensors`` (fp32 weights)
and ``tokenizer.json``; :func:`load_run` rebuilds the model from those three files alone.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, TextIO

import torch

from .checkpoint import latest
from .errors import CheckpointError, ConfigError
from .model import Transformer
from .probe import load_buildable
from .recipe import GenerateConfig, registry_of
from .runfolder import WEIGHTS, load_weights
from .tokenizer import load_tokenizer

RECIPE_FILE = "recipe.toml"
TOKENIZER_FILE = "tokenizer.json"


def resolve_run_dir(path: str | Path) -> Path:
    """The run folder for a run folder or its ``model.safetensors``; FileNotFoundError naming what is missing."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run folder or weights file")
    run_dir = path.parent if path.is_file() else path
    missing = [name for name in (RECIPE_FILE, WEIGHTS, TOKENIZER_FILE) if not (run_dir / name).is_file()]
    if missing:
        hint = "a run writes them when training ends"
        if latest(run_dir / "checkpoints") is not None:  # stopped early, or killed before its export
            hint = (f"it has a checkpoint: use it as {run_dir}@latest, or finish the run with playattention "
                    f"train --resume {run_dir}")
        raise FileNotFoundError(f"{run_dir}: not a finished run folder (missing {', '.join(missing)}; {hint})")
    return run_dir


def load_run(run_dir: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, tokenizer, recipe) of a finished run, built from its files alone.

    ``recipe.toml`` is the authoritative description of the run (``model.toml`` is for reading
    only); a damaged weights or tokenizer file is a CheckpointError naming it, in one line.
    """
    run_dir = resolve_run_dir(run_dir)
    recipe = load_buildable(run_dir / RECIPE_FILE)
    registry = registry_of(recipe)
    model = Transformer(recipe.model, registry)
    try:
        load_weights(model, run_dir / WEIGHTS)
    except Exception as exc:  # noqa: BLE001 - safetensors' own error type, a size mismatch, an unreadable file
        raise CheckpointError(_damaged(run_dir / WEIGHTS, exc)) from None
    try:
        tokenizer = load_tokenizer(run_dir / TOKENIZER_FILE, registry)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(_damaged(run_dir / TOKENIZER_FILE, exc)) from None
    return model.to(device).eval(), tokenizer, recipe


def _damaged(path: Path, exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    text = text.removeprefix(f"{path}: ")
    return f"{path}: cannot be loaded ({text}); the run folder is damaged"


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt; an empty prompt starts from end-of-text where the tokenizer has one.

    A tokenizer with a ``bos`` (a Hugging Face one that puts Llama's ``<s>`` before every text) starts
    the prompt with it, as transformers' tokenizer(prompt) does.
    """
    ids = tokenizer.encode(prompt)
    bos = getattr(tokenizer, "bos", None)
    if bos is not None:
        ids = [bos, *ids]
    if not ids and tokenizer.eot is not None:
        ids = [tokenizer.eot]
    if not ids:
        raise ValueError(f"prompt {prompt!r} encodes to no tokens; give at least one character")
    return ids


class TextStream:
    """Decodes a growing list of token ids and writes only the new text (whole characters only)."""

    def __init__(self, tokenizer, out: TextIO):
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.written = 0

    def __call__(self, token: torch.Tensor) -> None:
        self.ids.extend(int(t) for t in token.view(-1).tolist())
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character split across BPE tokens: wait for the rest
            return
        self.out.write(text[self.written:])
        self.out.flush()
        self.written = len(text)

    def close(self) -> None:
        text = self.tokenizer.decode(self.ids)
        self.out.write(text[self.written:])
        self.out.flush()


@torch.no_grad()
def sample(model, tokenizer, prompt: str, cfg: GenerateConfig, *, seed: int | None = None,
           device: str | torch.device | None = None, on_text: Callable[[torch.Tensor], None] | None = None) -> str:
    """One sample: the prompt followed by ``cfg.max_new_tokens`` generated tokens, as text."""
    if device is None:
        device = next(model.parameters()).device
    ids = torch.tensor([encode_prompt(tokenizer, prompt)], dtype=torch.long, device=device)  # (1, T)
    out = model.generate(ids, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                         seed=cfg.seed if seed is None else seed, on_token=on_text)
    return prompt + tokenizer.decode(out[0, ids.size(1):].tolist())


def stream_samples(model, tokenizer, prompts: list[str], cfg: GenerateConfig, num_samples: int = 1,
                   out: TextIO | None = None) -> list[str]:
    """Write samples to ``out`` (stdout) as the tokens are produced; sample i of a prompt uses seed + i."""
    out = sys.stdout if out is None else out
    texts = []
    for p, prompt in enumerate(prompts):
        for i in range(num_samples):
            if p or i:
                out.write("\n---------------\n")
            out.write(prompt)
            stream = TextStream(tokenizer, out)
            texts.append(sample(model, tokenizer, prompt, cfg, seed=cfg.seed + i, on_text=stream))
            stream.close()
    out.write("\n")
    out.flush()
    return texts


def check_generate_config(cfg: GenerateConfig, tokenizer, where: str = "generate") -> None:
    """Every prompt must encode (a char tokenizer knows only its corpus's characters)."""
    problems = []
    for i, prompt in enumerate(cfg.prompts):
        try:
            encode_prompt(tokenizer, prompt)
        except ValueError as exc:
            problems.append(f"{where}.prompts[{i}]: {exc}")
    if problems:
        raise ConfigError(problems)
