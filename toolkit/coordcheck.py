"""The coordinate check of a parametrization (Yang et al. 2021, "Tensor Programs V", section 4 and fig. 5).

Train the recipe's model at several widths for a few steps with its own optimizer at a fixed
learning rate, and record the mean |coordinate| of each kind of activation after every step. Under
muP the curves are flat in width; under the standard parametrization the hidden activations and the
logits grow with width (the updates of a width-n matrix move its output by ~n x lr), which is why
a learning rate tuned small does not transfer. ``playattention coordcheck RECIPE`` runs it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import attrs
import torch

from .data.sources import resolve_sources
from .errors import UsageError
from .families import SPEC_TYPES
from .model import Transformer
from .probe import load_buildable
from .recipe import registry_of
from .safeio import read_text

#: what is measured: the token embeddings, every attention's and MLP's output (averaged over layers), the logits
KINDS = ("embedding", "attention", "mlp", "logits")
PARAMETRIZATIONS = ("standard", "mup")


def corpus_tokens(recipe, registry, limit: int = 2_000_000) -> torch.Tensor:
    """The recipe's first plain-text source (up to ``limit`` characters) in its tokenizer, (N,) int64."""
    texts = [p for p in resolve_sources(recipe.data, registry) if p.suffix == ".txt"]
    if not texts:
        raise UsageError("coordcheck reads the recipe's data as plain text, and none of its sources is a .txt file")
    text = read_text(texts[0], limit=None)[:limit]
    tokenizer = registry.build_in("tokenizer", recipe.data.tokenizer, text)
    if tokenizer.vocab_size > recipe.model.vocab_size:
        raise UsageError(f"model.vocab_size ({recipe.model.vocab_size}) is smaller than the tokenizer's "
                         f"{tokenizer.vocab_size} tokens of {texts[0]}")
    return torch.as_tensor(tokenizer.encode_corpus(text), dtype=torch.long)


def sample_batches(tokens: torch.Tensor, n: int, batch: int, T: int, seed: int) -> list[tuple[torch.Tensor, ...]]:
    """``n`` (x, y) batches of (batch, T) at fixed random offsets: the same data order at every width."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        i = torch.randint(len(tokens) - T - 1, (batch,), generator=gen)
        x = torch.stack([tokens[j:j + T] for j in i.tolist()])  # (B, T)
        y = torch.stack([tokens[j + 1:j + T + 1] for j in i.tolist()])
        out.append((x, y))
    return out


def measure(recipe, model_config, registry, batches, lr: float, seed: int) -> dict[str, list[float]]:
    """Mean |activation| of each kind in KINDS at init and after each step (len(batches) - 1 steps)."""
    torch.manual_seed(seed)
    model = Transformer(model_config, registry)
    model.train()
    train = attrs.evolve(recipe.train, lr=lr)
    # the toolkit's own optimizer with its groups and the parametrization's lr hints, at a constant lr
    # (no schedule, no DeepSpeed: the check is about the parametrization, not the run)
    plain = attrs.evolve(recipe, train=train, deepspeed=attrs.evolve(recipe.deepspeed, offload="none"))
    optimizer = registry.build_in("optimizer", recipe.train.optimizer, model, plain)
    sums: dict[str, list[float]] = {}

    def record(kind):
        def hook(_module, _args, output):
            sums.setdefault(kind, []).append(output.detach().abs().mean().item())
        return hook

    handles = [model.transformer.wte.register_forward_hook(record("embedding"))]
    handles += [module.register_forward_hook(record(family)) for family, _, module, _ in model.parts
                if family in ("attention", "mlp")]
    out: dict[str, list[float]] = {k: [] for k in KINDS}
    try:
        for t, (x, y) in enumerate(batches):
            sums.clear()
            logits, loss = model(x, y)
            for kind in KINDS[:-1]:
                out[kind].append(sum(sums[kind]) / len(sums[kind]))
            out["logits"].append(logits.detach().abs().mean().item())
            if t < len(batches) - 1:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    finally:
        for h in handles:
            h.remove()
    return out


def coord_check(recipe, widths: list[int], steps: int = 4, *, base_width: int | None = None, lr: float | None = None,
                batch: int | None = None, seed: int = 0, parametrizations=PARAMETRIZATIONS, tokens=None,
                say=lambda line: None) -> dict:
    """The coordinate check: ``{"results": {parametrization: {kind: [[value per width] per step]}}, ...}``.

    Step 0 is the model at init; step ``steps`` after that many optimizer steps. mup's base width
    is ``base_width`` (default: the smallest width), so the smallest model is the same in both.
    """
    model = recipe.model
    if len(widths) < 2 or sorted(set(widths)) != list(widths):
        raise UsageError(f"--widths: give two or more increasing widths, got {','.join(map(str, widths))}")
    if model.head_dim is None and any(w % model.n_head for w in widths):
        raise UsageError(f"--widths: every width must be divisible by model.n_head ({model.n_head}), "
                         f"got {','.join(map(str, widths))}")
    if steps < 1:
        raise UsageError(f"--steps must be at least 1, got {steps}")
    if lr is not None and not lr > 0:
        raise UsageError(f"--lr must be > 0, got {lr}")
    registry = registry_of(recipe)
    base_width = base_width or widths[0]
    lr = lr or recipe.train.lr
    tokens = corpus_tokens(recipe, registry) if tokens is None else tokens
    batches = sample_batches(tokens, steps + 1, batch or recipe.train.micro_batch, model.block_size, seed)
    spec = SPEC_TYPES["parametrization"]
    results = {}
    for kind in parametrizations:
        chosen = spec(kind, {"base_width": base_width} if kind == "mup" else None)
        per_width = []
        for w in widths:
            say(f"{kind} width {w}: {steps} steps")
            per_width.append(measure(recipe, attrs.evolve(model, n_embd=w, parametrization=chosen), registry, batches,
                                     lr, seed))
        results[kind] = {k: [[m[k][t] for m in per_width] for t in range(steps + 1)] for k in KINDS}
    return {"widths": list(widths), "steps": steps, "base_width": base_width, "lr": lr, "results": results}


def growth(check: dict, parametrization: str, kind: str, step: int | None = None) -> float:
    """How much an activation grows from the smallest width to the largest: value(widest) / value(narrowest)."""
    values = check["results"][parametrization][kind][check["steps"] if step is None else step]
    return values[-1] / values[0]


def render(check: dict) -> str:
    """A table: mean |activation| after the last step per width, and the growth from narrowest to widest."""
    widths = check["widths"]
    head = f"{'':9} {'':10}" + "".join(f"{w:>10}" for w in widths) + f"{'growth':>10}"
    lines = [f"mean |activation| after {check['steps']} steps at lr {check['lr']:g} (mup base width "
             f"{check['base_width']})", head]
    for p, by_kind in check["results"].items():
        for kind, per_step in by_kind.items():
            row = "".join(f"{v:>10.4g}" for v in per_step[-1])
            lines.append(f"{p:9} {kind:10}{row}{growth(check, p, kind):>9.2f}x")
    return "\n".join(lines)


def plot(check: dict, path: str | Path) -> Path:
    """Log-log mean |activation| against width per kind, one panel per parametrization, the last step solid."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    results = check["results"]
    fig = Figure(figsize=(4.2 * len(results), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(results), sharey=True, squeeze=False)[0]
    colors = dict(zip(KINDS, ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    for ax, (p, by_kind) in zip(axes, results.items()):
        for kind, per_step in by_kind.items():
            ax.plot(check["widths"], per_step[0], color=colors[kind], alpha=0.35, linestyle=":", marker=".")
            ax.plot(check["widths"], per_step[-1], color=colors[kind], marker="o", label=kind)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(check["widths"], [str(w) for w in check["widths"]])
        ax.set_title(f"{p}: after {check['steps']} steps (dotted: init)", fontsize=10)
        ax.set_xlabel("width (n_embd)")
    axes[0].set_ylabel("mean |activation|")
    axes[0].legend(fontsize=8)
    path = Path(path)
    fig.savefig(path, dpi=80)
    return path


# -- the command (toolkit/cli.py adds it) ----------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe TOML file (its model at other widths, its optimizer, its data)")
    p.add_argument("--widths", default="64,128,256", metavar="W,W,...",
                   help="n_embd of each model, increasing (default 64,128,256)")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps before the last measurement (default 4)")
    p.add_argument("--base-width", type=int, default=None, metavar="W", help="mup's base width (default: the smallest)")
    p.add_argument("--lr", type=float, default=None, help="constant learning rate (default: the recipe's train.lr)")
    p.add_argument("--seed", type=int, default=0, help="the models' init and the batches (default 0)")
    p.add_argument("--out", default="coordcheck.png", metavar="PNG",
                   help="the plot (default coordcheck.png); the numbers go next to it as .json")


def run(args) -> int:
    try:
        widths = [int(w) for w in args.widths.split(",")]
    except ValueError:
        raise UsageError(f"--widths: expected integers separated by commas, got {args.widths!r}") from None
    recipe = load_buildable(args.recipe, args.set, args.plugin)
    check = coord_check(recipe, widths, args.steps, base_width=args.base_width, lr=args.lr, seed=args.seed,
                        say=lambda line: print(line, file=sys.stderr, flush=True))
    print(render(check))
    png = plot(check, args.out)
    png.with_suffix(".json").write_text(json.dumps(check, indent=1))
    print(f"plot: {png}  numbers: {png.with_suffix('.json')}")
    return 0
