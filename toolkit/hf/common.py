"""Reading and writing Hugging Face checkpoint folders (config.json + weights), from local files only.

Nothing here downloads: a path is a folder on disk laid out as ``save_pretrained`` writes it.
Weights come from ``model.safetensors``, a sharded ``model.safetensors.index.json``, or the
legacy ``pytorch_model.bin`` (loaded with ``torch.load(weights_only=True)``, which runs no pickled code).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .. import safeio
from ..errors import HFFormatError
from ..model import Transformer

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
CONFIG = "config.json"


def checkpoint_dir(path: str | Path) -> Path:
    """The folder ``path`` as a Path, or a FileNotFoundError naming what is missing."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint folder")
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: expected a checkpoint folder (with {CONFIG} and {SAFETENSORS}), got a file")
    return path


def read_config(path: str | Path) -> dict:
    """The parsed ``config.json`` of a checkpoint folder."""
    file = checkpoint_dir(path) / CONFIG
    if not file.exists() and not file.is_symlink():
        raise FileNotFoundError(f"{file}: no such file (a Hugging Face checkpoint folder needs {CONFIG})")
    try:
        data = safeio.read_json(file)  # a FIFO, /dev/zero, not UTF-8, nested deep: one line
    except (safeio.UnsafeFile, safeio.BadContent) as exc:
        raise HFFormatError(str(exc)) from None
    if not isinstance(data, dict):
        raise HFFormatError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder, by their Hugging Face names, on the CPU."""
    folder = checkpoint_dir(path)
    if (folder / SAFETENSORS).is_file():
        return _safetensors_load(folder / SAFETENSORS)
    if (folder / SAFETENSORS_INDEX).is_file():
        out: dict[str, torch.Tensor] = {}
        for shard in _shards(folder / SAFETENSORS_INDEX):
            out.update(_safetensors_load(shard))
        return out
    if (folder / TORCH_BIN).is_file():
        return _torch_load(folder / TORCH_BIN)
    if (folder / TORCH_BIN_INDEX).is_file():
        out = {}
        for shard in _shards(folder / TORCH_BIN_INDEX):
            out.update(_torch_load(shard))
        return out
    raise FileNotFoundError(
        f"{folder}: no weights found (looked for {SAFETENSORS}, {SAFETENSORS_INDEX}, {TORCH_BIN}, {TORCH_BIN_INDEX})"
    )


def _shards(index_file: Path) -> list[Path]:
    try:
        weight_map = safeio.read_json(index_file)["weight_map"]
        names = list(dict.fromkeys(weight_map.values()))
    except (safeio.UnsafeFile, safeio.BadContent, KeyError, TypeError, AttributeError):
        raise HFFormatError(f"{index_file}: not a weight index (expected a JSON object with a 'weight_map')") from None
    shards = [index_file.parent / name for name in names if isinstance(name, str)]
    for shard in shards:
        if not shard.is_file():
            raise FileNotFoundError(f"{shard}: no such file (named by {index_file.name})")
        safeio.open_regular(shard).close()
    return shards


def _safetensors_load(file: Path) -> dict[str, torch.Tensor]:
    safeio.open_regular(file).close()  # a FIFO or /dev/zero behind a symlink: refused by name
    try:
        return load_file(file)
    except Exception as exc:  # noqa: BLE001 - safetensors' own error type: a truncated or garbled file
        first = (str(exc).strip().splitlines() or [""])[0]
        raise HFFormatError(f"{file}: cannot load weights ({type(exc).__name__}: {first})") from None


def _torch_load(file: Path) -> dict[str, torch.Tensor]:
    safeio.open_regular(file).close()
    try:
        sd = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a corrupt or code-carrying pickle; say which file
        first = (str(exc).strip().splitlines() or [""])[0]
        raise HFFormatError(f"{file}: cannot load weights ({type(exc).__name__}: {first})") from None
    if not isinstance(sd, dict):
        raise HFFormatError(f"{file}: expected a dict of tensors, got {type(sd).__name__}")
    return sd


def write_checkpoint(folder: str | Path, config: dict, state_dict: dict[str, torch.Tensor]) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``folder`` (created if missing)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder}: exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    # safetensors refuses tensors that share storage (tied or transposed views): give each its own
    tensors = {k: t.detach().to("cpu").contiguous().clone() for k, t in state_dict.items()}
    save_file(tensors, str(folder / SAFETENSORS), metadata={"format": "pt"})
    (folder / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def unwrap(model) -> Transformer:
    """The toolkit Transformer inside a DeepSpeed/DDP wrapper or a torch.compile'd module."""
    inner = getattr(model, "module", model)  # DeepSpeed / DDP wrappers
    inner = getattr(inner, "_orig_mod", inner)  # torch.compile
    if not isinstance(inner, Transformer):
        raise TypeError(f"expected a toolkit Transformer, got {type(model).__name__}")
    return inner


def check_architecture(config: dict, model_type: str, architectures: Iterable[str], where: str) -> None:
    """Refuse a config.json whose ``model_type`` is not the one this loader reads."""
    got = config.get("model_type")
    if got != model_type:
        archs = ", ".join(config.get("architectures") or []) or "none listed"
        raise HFFormatError(
            f"{where}: model_type {got!r} is not {model_type!r} (architectures: {archs}); "
            f"this loader reads {'/'.join(architectures)} checkpoints"
        )


def load_into(model: nn.Module, state_dict: dict[str, torch.Tensor], where: str) -> None:
    """Copy ``state_dict`` (already in this toolkit's names) into ``model``, reporting every mismatch at once."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = [
        f"{k} {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own if k in state_dict and state_dict[k].shape != own[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected {_few(unexpected)}")
    if wrong:
        problems.append(f"shape mismatch {_few(wrong)}")
    if problems:
        raise HFFormatError(f"{where}: weights do not fit the model: {'; '.join(problems)}")
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(state_dict[k])  # copy_ casts (e.g. fp16 files into an fp32 model)


def _few(items: list[str], n: int = 4) -> str:
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more



#: config.json keys that never change what a model computes: bookkeeping, label maps, generation
#: defaults (generation_config.json is their home now), and switches transformers reads only to return
#: extra outputs. Any other key an importer does not read is refused (see :class:`ConfigReader`).
HARMLESS_KEYS = frozenset({
    "_name_or_path", "architectures", "model_type", "transformers_version", "dtype", "torch_dtype",
    "use_bfloat16", "torchscript", "tf_legacy_loss", "_attn_implementation_autoset", "_commit_hash",
    "output_hidden_states", "output_attentions", "return_dict", "use_return_dict", "use_cache",
    "id2label", "label2id", "problem_type", "finetuning_task", "task_specific_params", "prefix", "tokenizer_class",
    "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    "chunk_size_feed_forward",  # feed-forward in chunks: the same numbers, less memory
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
    "_attn_implementation", "cache_implementation", "gradient_checkpointing",  # how, not what, it computes
    # dropout is training only and never inherited (the recipe's model.dropout decides, as nanoGPT's from_pretrained)
    "attention_dropout", "hidden_dropout", "classifier_dropout", "embd_pdrop", "resid_pdrop", "attn_pdrop",
})
#: keys that are harmless only at these values (anything else describes a model this toolkit does not build)
HARMLESS_AT = {"is_encoder_decoder": (False,), "is_decoder": (False, True), "add_cross_attention": (False,),
               "tie_encoder_decoder": (False,), "pruned_heads": ({},), "cross_attention_hidden_size": (None,)}

_MISSING = object()


class ConfigReader:
    """A config.json read key by key: :meth:`finish` refuses every key no one read, so no setting is ignored.

    Every adapter reads through one (:meth:`toolkit.hf.Adapter.config_from_hf` makes it and calls finish),
    so a key an importer does not read is refused in one line naming it and the file.

    An absent key takes the architecture's default, which must be transformers' own (its config class's
    field default: e.g. Mistral's sliding_window is 4096 when absent, and none when null).
    """

    def __init__(self, hf: dict, where: str, defaults: dict | None = None):
        self.hf, self.where, self.defaults = hf, where, defaults or {}
        self.read: set[str] = set()

    def get(self, key: str, default=_MISSING):
        """config.json's value of ``key`` (null included), else ``default``, else the architecture's (else None)."""
        self.read.add(key)
        if key in self.hf:
            return self.hf[key]
        return self.defaults.get(key) if default is _MISSING else default

    def need(self, key: str, kind: type = int):
        """A key that must be there (or have a default), of type ``kind``; HFFormatError otherwise."""
        value = self.get(key)
        if value is None:
            raise HFFormatError(f"{self.where}: config.json lacks {key}")
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise HFFormatError(f"{self.where}: {key} = {value!r}: expected an integer")
        if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise HFFormatError(f"{self.where}: {key} = {value!r}: expected a number")
        return kind(value)

    def only(self, key: str, allowed: tuple, why: str):
        """The value of ``key``, which must be one of ``allowed`` (absent counts as the default)."""
        value = self.get(key)
        if value not in allowed:
            raise HFFormatError(f"{self.where}: {key} = {json.dumps(value)} is not supported ({why})")
        return value

    def finish(self) -> None:
        """Refuse the first key no one read that is not known to be harmless; a null is unset (transformers
        writes null for a setting no one chose)."""
        for key, value in self.hf.items():
            if key in self.read or key in HARMLESS_KEYS or value is None:
                continue
            if key in HARMLESS_AT:
                if value in HARMLESS_AT[key] or (value is None and None in HARMLESS_AT[key]):
                    continue
                raise HFFormatError(f"{self.where}: {key} = {json.dumps(value)} is not supported")
            raise HFFormatError(f"{self.where}: {key} = {_short(value)} is not supported by this importer "
                                f"(refused rather than risk wrong numbers)")


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
