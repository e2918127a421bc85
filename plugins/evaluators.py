"""Built-in evaluators. Contract: factory(opts, ctx) -> callable: model -> {metric: float} (toolkit.evaluate).

    hellaswag   multiple-choice accuracy from a local JSONL in HellaSwag's format (Zellers et al. 2019):
                each ending scored as a completion of the context, as build-nanogpt's hellaswag.py does
    perplexity  token-weighted mean loss and perplexity on a prepared split or a text file
    attention_stats  per-layer sink mass, entropy and mean distance of the attention maps on fixed
                validation windows (toolkit.headstats), through the model's observe_attention()

Both score with :func:`toolkit.scoring.score_continuations`, the scorer the lm-evaluation-harness
adapter uses too, and nothing is downloaded: the files are yours. A recipe lists them as
``[[eval]]`` tables; they run at every evaluation and ``playattention eval`` runs them on a
finished run. Work is split across ranks (``ctx.shard``) and summed (``ctx.sum``).
"""
from __future__ import annotations

from pathlib import Path

import attrs
from attrs import validators as v

from toolkit.hookspecs import hookimpl


def _where(opts, recipe) -> str:
    """``$.eval[i]`` of the evaluator whose options are ``opts`` in the recipe."""
    index = next((i for i, spec in enumerate(recipe.eval) if spec.options is opts), None)
    return f"$.eval[{index}]" if index is not None else "$.eval"


def _missing(path: str | None, where: str, key: str = "path") -> list[str]:
    if path is not None and not Path(path).expanduser().is_file():
        return [f"{where}.{key}: no such file: {path}"]
    return []


@attrs.frozen
class MultipleChoiceOptions:
    # a JSONL file of {"ctx", "endings", "label"} lines, e.g. HellaSwag's hellaswag_val.jsonl (relative
    # paths are relative to the working directory, as data.paths)
    path: str = attrs.field(validator=v.instance_of(str))
    limit: int | None = attrs.field(default=None, validator=v.optional(v.gt(0)))  # the first N examples only
    # rows (one per ending) per forward; default train.micro_batch
    batch_size: int | None = attrs.field(default=None, validator=v.optional(v.gt(0)))

    @staticmethod
    def check_recipe(opts: MultipleChoiceOptions, recipe) -> list[str]:
        return _missing(opts.path, _where(opts, recipe))


@attrs.frozen
class PerplexityOptions:
    split: str = "val"  # the split of the prepared data
    # a prepared dataset folder (`playattention prepare`); default the run's own prepared data
    prepared: str | None = None
    path: str | None = None  # a text file instead, read whole and tokenized with the run's tokenizer
    # at most this many batches of batch_size windows of block_size tokens; default the whole split or file
    batches: int | None = attrs.field(default=None, validator=v.optional(v.gt(0)))
    batch_size: int | None = attrs.field(default=None, validator=v.optional(v.gt(0)))  # default train.micro_batch

    @staticmethod
    def check_recipe(opts: PerplexityOptions, recipe) -> list[str]:
        where = _where(opts, recipe)
        if opts.path is not None and opts.prepared is not None:
            return [f"{where}: give path (a text file) or prepared (a prepared dataset), not both"]
        if opts.prepared is not None and not Path(opts.prepared).expanduser().is_dir():
            return [f"{where}.prepared: no such prepared dataset folder: {opts.prepared}"]
        return _missing(opts.path, where)


@attrs.frozen
class AttentionStatsOptions:
    split: str = "val"  # the split of the prepared data
    prepared: str | None = None  # a prepared dataset folder; default the run's own prepared data
    windows: int = attrs.field(default=4, validator=v.gt(0))  # fixed windows, spread evenly over the split
    length: int | None = attrs.field(default=None, validator=v.optional(v.gt(1)))  # tokens each; default block_size


@hookimpl
def register_evaluators(register):
    register("hellaswag", "toolkit.plugins.impl.evaluators:MultipleChoice", MultipleChoiceOptions,
             doc="Multiple-choice accuracy (HellaSwag's JSONL): acc by summed ending loss, acc_norm by loss per token.")
    register("perplexity", "toolkit.plugins.impl.evaluators:Perplexity", PerplexityOptions,
             doc="Token-weighted mean loss and perplexity over a prepared split or a text file.")
    register("attention_stats", "toolkit.plugins.impl.evaluators:AttentionStats", AttentionStatsOptions,
             doc="Per-layer attention sink mass, entropy and mean distance on fixed validation windows.")
