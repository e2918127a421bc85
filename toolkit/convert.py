"""Hugging Face folders <-> run folders, and a run's weights from either (``train --init-from``).

``playattention convert HF_DIR OUT_DIR`` (:func:`hf_to_run`) writes a run folder, as training leaves
one, from a Hugging Face folder of any registered architecture (``playattention plugins architecture``)::

    OUT_DIR/
        recipe.toml        the model as a recipe (data and training: a starting point for fine-tuning)
        model.safetensors  fp32 weights under this toolkit's names, with model.toml
        tokenizer.json     the folder's tokenizer (tokenizer.json, or GPT-2-style vocab.json + merges.txt)
        versions.json      what converted it
        summary.json       where it came from: folder, architecture, parameters

so ``playattention generate OUT_DIR``, ``playattention train OUT_DIR --init-from OUT_DIR`` and
ablation files (``recipe = "OUT_DIR"``) take it. ``convert RUN_DIR OUT_DIR --to hf``
(:func:`run_to_hf`) writes config.json + model.safetensors in the first architecture that can
express the model (or ``--arch``) with the tokenizer's files, for transformers' from_pretrained.
"""
from __future__ import annotations

import time
from pathlib import Path

import attrs
import torch
from safetensors.torch import load_file

from . import checkpoint
from .errors import CheckpointError, ConfigError, HFFormatError, UsageError, one_line
from .data import prepared_dir
from .generate import RECIPE_FILE, TOKENIZER_FILE, load_run
from .hf import adapter_for, export_architecture, hf_model_config, read_config, read_state_dict
from .hf.common import CONFIG, load_into, unwrap, write_checkpoint
from .model import ModelConfig, Transformer
from .plugin_manager import load_registry
from .probe import load_buildable
from .recipe import DataConfig, GenerateConfig, Recipe, TrainConfig, diff_recipes, registry_of
from .registry import Registry
from .runfolder import LOCK_FILE, WEIGHTS, RunFolder, load_state, lock_folder
from .tokenizer import GPT2Tokenizer, HFTokenizer, Tokenizer, load_tokenizer

#: recipe keys a run may change from the model it starts from: neither changes a weight's shape or value
FREE_MODEL_KEYS = ("model.dropout", "model.block_size")


# -- what a folder is ---------------------------------------------------------------------------------
def is_hf_folder(path: str | Path) -> bool:
    """A folder with config.json (and no recipe.toml): a Hugging Face checkpoint."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG).is_file() and not (path / RECIPE_FILE).is_file()


def _empty_target(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(p.name != LOCK_FILE for p in out.iterdir())):
        raise UsageError(f"{out}: exists and is not an empty folder; give a new or empty OUT_DIR")


# -- Hugging Face -> run folder ---------------------------------------------------------------------
def recipe_for(config: ModelConfig, name: str, tokenizer: Tokenizer | None, tokenizer_path: Path | None,
               description: str = "") -> Recipe:
    """A recipe for an imported model: the model as it is; data and training a starting point for fine-tuning."""
    data = DataConfig()
    if isinstance(tokenizer, GPT2Tokenizer):
        data = DataConfig(tokenizer="gpt2")
    elif isinstance(tokenizer, HFTokenizer) and tokenizer_path is not None:
        eot = tokenizer.fast.id_to_token(tokenizer.eot) if tokenizer.eot is not None else ""
        data = DataConfig(tokenizer={"kind": "hf", "path": str(tokenizer_path.resolve()), "eot": eot})
    train = TrainConfig(micro_batch=4, max_steps=100, lr=3e-5, min_lr=3e-6, warmup_steps=10, eval_interval=50,
                        eval_batches=4)
    gen = GenerateConfig(prompts=["The"] if tokenizer is not None else ["\n"], max_new_tokens=64, temperature=0.7,
                         top_k=50)
    return Recipe(name=name, description=description, model=attrs.evolve(config, dropout=0.0), data=data,
                  train=train, generate=gen)


def hf_to_run(hf_dir: str | Path, out_dir: str | Path, *, registry: Registry | None = None, plugins=()) -> dict:
    """Convert a Hugging Face folder into a run folder; returns what summary.json says."""
    hf_dir, out = Path(hf_dir), Path(out_dir)
    if not is_hf_folder(hf_dir):
        raise UsageError(f"{hf_dir}: not a Hugging Face folder (expected {CONFIG} and weights; a run folder "
                         f"converts the other way: --to hf)")
    registry = registry or (load_registry(plugins) if plugins else None)  # --plugin: an architecture of a plugin
    arch = adapter_for(read_config(hf_dir), f"{hf_dir}/{CONFIG}", registry)
    model = arch.load(hf_dir, registry=registry)  # refused before OUT_DIR is touched
    tokenizer = arch.tokenizer_from_hf(hf_dir)
    _empty_target(out)
    lock = lock_folder(out)  # creates it; one writer: a second convert into it (or a training there) is refused
    try:
        _empty_target(out)  # again under the lock: another writer may have filled it meanwhile
        return _write_converted(hf_dir, out, arch, model, tokenizer, registry)
    finally:
        lock.release()


def _write_converted(hf_dir: Path, out: Path, arch, model, tokenizer, registry) -> dict:
    tok_path = out / TOKENIZER_FILE if tokenizer is not None else None
    recipe = recipe_for(model.config, out.name or arch.model_type, tokenizer, tok_path,
                        description=f"{arch.hf_class} converted from {hf_dir.resolve()}")
    reg = registry or registry_of(recipe)
    folder = RunFolder(out, recipe.name)
    folder.write_identity(recipe, reg, tokenizer)
    folder.write_export(model.state_dict(), recipe, 0)
    summary = {"run_dir": str(out), "status": "converted", "recipe": recipe.name, "source": str(hf_dir.resolve()),
               "architecture": arch.model_type, "hf_class": arch.hf_class, "params": model.num_params(),
               "tokenizer": tokenizer.name if tokenizer is not None else None,
               "converted": time.strftime("%Y-%m-%d %H:%M:%S")}
    folder.write_summary(summary)  # no metrics.jsonl here, so no plots
    return summary


# -- a model to use: a run, any of its checkpoints, or a Hugging Face folder ------------------------------
def load_model(source: str | Path, device: str | torch.device = "cpu", plugins=()):
    """(model in eval mode, tokenizer, recipe, prepared data dir or None) of what generate, eval and
    convert --to hf take: a finished run folder (or its model.safetensors), a checkpoint of a run
    (``RUN@latest``, ``RUN@best``, ``RUN@step-N``, ``RUN/checkpoints/step-NNNNNNN``: its own
    tokenizer and weights), or a Hugging Face folder of any architecture convert reads (built in, from an
    installed package or from ``plugins``), with its own tokenizer. Problems are one line
    (FileNotFoundError, UsageError, CheckpointError)."""
    run, found = checkpoint.resolve_checkpoint(source)
    if found is not None:
        model, tokenizer, recipe = load_checkpoint_model(run, found)
    elif is_hf_folder(run):
        model, tokenizer, recipe = load_hf_model(run, load_registry(plugins) if plugins else None)
        return model.to(device).eval(), tokenizer, recipe, None
    else:
        model, tokenizer, recipe = load_run(run)
    return model.to(device).eval(), tokenizer, recipe, prepared_dir(recipe.data)


def load_checkpoint_model(run: Path, found: Path):
    """(model, tokenizer, recipe) of checkpoint ``found`` of ``run``: the run's recipe (a resume may not
    change its model), the tokenizer saved with the checkpoint, its weights consolidated."""
    if not (run / RECIPE_FILE).is_file():
        raise FileNotFoundError(f"{run}: not a run folder (no {RECIPE_FILE})")
    recipe = load_buildable(run / RECIPE_FILE)
    registry = registry_of(recipe)
    model = Transformer(recipe.model, registry)
    try:
        load_state(model, checkpoint.checkpoint_weights(found), found)
        tokenizer = load_tokenizer(found / TOKENIZER_FILE, registry)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{found}: cannot be loaded ({one_line(str(exc))})") from None
    return model, tokenizer, recipe


def load_hf_model(folder: Path, registry: Registry | None = None):
    """(model, tokenizer, recipe) of a Hugging Face folder: its own tokenizer (the shipped GPT-2 BPE for a
    GPT-2 folder that has none); UsageError for another architecture without one."""
    try:
        arch = adapter_for(read_config(folder), f"{folder}/{CONFIG}", registry)
        model = arch.load(folder, registry=registry)
    except HFFormatError as exc:
        raise UsageError(f"{folder}: {exc}") from None
    tokenizer = arch.tokenizer_from_hf(folder)
    if tokenizer is None:
        if model.config.vocab_size < GPT2Tokenizer().vocab_size:
            raise UsageError(f"{folder}: no tokenizer (tokenizer.json, or vocab.json + merges.txt) for its "
                             f"{model.config.vocab_size}-token vocabulary")
        tokenizer = GPT2Tokenizer()  # OpenAI's GPT-2 folders are often saved without one
    tok_path = folder if isinstance(tokenizer, HFTokenizer) else None
    return model, tokenizer, recipe_for(model.config, folder.resolve().name, tokenizer, tok_path)


# -- run folder -> Hugging Face -----------------------------------------------------------------------
def run_to_hf(run_dir: str | Path, out_dir: str | Path, *, model_type: str | None = None,
              registry: Registry | None = None, plugins=()) -> dict:
    """Write a finished run as a Hugging Face folder (config.json, model.safetensors, tokenizer files), in an
    architecture of ``registry`` (default: the built-ins, installed packages, the run recipe's plugins and
    ``plugins``)."""
    if is_hf_folder(run_dir):
        raise UsageError(f"{run_dir}: a Hugging Face folder already; --to hf converts a run folder (leave it out "
                         f"to make a run folder of this one)")
    out = Path(out_dir)
    model, tokenizer, recipe, _ = load_model(run_dir)  # a finished run or any checkpoint of one
    run = str(run_dir)
    registry = registry or load_registry([*recipe.plugins, *plugins])
    arch, config = export_architecture(model, model_type, registry)  # refused before OUT_DIR is touched
    _empty_target(out)
    config.update(arch.tokenizer_to_hf(tokenizer, out, recipe.model.block_size))  # bos/eos ids
    inner = unwrap(model)
    write_checkpoint(out, config, arch.state_dict_to_hf(inner.state_dict(), inner.config))
    return {"run_dir": str(run), "out": str(out), "architecture": arch.model_type, "hf_class": arch.hf_class,
            "files": sorted(p.name for p in out.iterdir())}


# -- a run's weights from a run or Hugging Face folder (train --init-from) ----------------------------
def init_source(source: str | Path, registry: Registry | None = None) -> tuple[ModelConfig, str]:
    """(model config, "run" or "hf") of an --init-from folder; UsageError when it is neither."""
    path = Path(source)
    if is_hf_folder(path):
        return hf_model_config(path, registry=registry), "hf"
    if path.is_dir() and (path / RECIPE_FILE).is_file():
        if not (path / WEIGHTS).is_file():
            raise UsageError(f"--init-from {path}: the run has no {WEIGHTS} yet (a run writes it when "
                             f"training ends; to continue an unfinished run use --resume)")
        return load_buildable(path / RECIPE_FILE).model, "run"
    raise UsageError(f"--init-from {path}: not a run folder (recipe.toml + model.safetensors) nor a Hugging Face "
                     f"folder (config.json + weights)")


def recipe_for_init(source: str | Path) -> Recipe:
    """The recipe a ``train --init-from SOURCE`` without a recipe trains: a run's own, or one made for a HF folder."""
    path = Path(source)
    config, kind = init_source(path)
    if kind == "run":
        return load_buildable(path / RECIPE_FILE)
    tokenizer = adapter_for(read_config(path), f"{path}/{CONFIG}").tokenizer_from_hf(path)
    tok_path = path if isinstance(tokenizer, HFTokenizer) else None
    return recipe_for(config, path.resolve().name, tokenizer, tok_path, description=f"fine-tuned from {path.resolve()}")


def model_differences(source: ModelConfig, ours: ModelConfig, plugins: list[str] | None = None) -> list[str]:
    """``key: source -> recipe`` for every model setting in which the recipe differs from the source's model.

    Dropout and block_size may differ (a fine-tune chooses them), except where block_size sizes a
    weight (learned positions).
    """
    lines = diff_recipes(Recipe(plugins=list(plugins or []), model=source), Recipe(plugins=list(plugins or []), model=ours))
    learned = ours.position.kind == "learned" or source.position.kind == "learned"
    free = FREE_MODEL_KEYS if not learned else ("model.dropout",)
    return [line for line in lines if line.startswith("model.") and not line.startswith(tuple(f + ":" for f in free))]


def check_init(source: str | Path, config: ModelConfig, plugins: list[str] | None = None) -> str:
    """Refuse (ConfigError, one line per difference) a recipe model that differs from the one in ``source``;
    returns the source's kind, "run" or "hf"."""
    path = Path(source)
    theirs, kind = init_source(path, load_registry(plugins or []))
    lines = model_differences(theirs, config, plugins)
    if lines:
        raise ConfigError([f"--init-from {path}: the recipe's model differs from the one there ({line})"
                           for line in lines])
    return kind


def init_weights(model: Transformer, source: str | Path, plugins: list[str] | None = None) -> None:
    """Load the weights of a run or Hugging Face folder into ``model``, whose recipe must describe the same model."""
    path = Path(source)
    kind = check_init(path, model.config, plugins)
    if kind == "hf":
        hf, registry = read_config(path), load_registry(plugins or [])
        arch = adapter_for(hf, f"{path}/{CONFIG}", registry)
        state = arch.state_dict_from_hf(read_state_dict(path), hf_model_config(path, registry=registry), str(path))
    else:
        try:
            state = load_file(str(path / WEIGHTS))
        except Exception as exc:  # noqa: BLE001 - safetensors' own error type: a truncated or garbled file
            first = (str(exc).strip().splitlines() or [""])[0]
            raise CheckpointError(f"--init-from {path / WEIGHTS}: cannot be loaded "
                                  f"({type(exc).__name__}: {first})") from None
        if model.config.tie_embeddings and "transformer.wte.weight" in state:
            state["lm_head.weight"] = state["transformer.wte.weight"]  # written once (a tied head)
    try:
        load_into(model, state, f"--init-from {path}")
    except HFFormatError as exc:
        raise CheckpointError(str(exc)) from None
