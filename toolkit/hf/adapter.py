"""One Hugging Face architecture, both ways: the :class:`Adapter` a plugin registers for a ``model_type``.

The shape is torchtitan's StateDictAdapter: config.json <-> :class:`~toolkit.model.ModelConfig`,
HF tensors <-> ours, and the tokenizer's files. Architectures are a registered family
(``register_architectures``, :mod:`toolkit.families`); the built-in ones register from
``plugins/architectures.py`` like any plugin, so a plugin package adds one without touching toolkit/::

    class MyAdapter(Adapter):  # its docstring's first line is what `playattention plugins` shows
        model_type, hf_class = "my_model", "MyModelForCausalLM"
        def read_config(self, r, dropout): ...        # r.get / r.need every key; the rest is refused
        def state_dict_from_hf(self, hf_sd, config, where): ...
        def config_to_hf(self, model): ...            # leave out: import only
        def state_dict_to_hf(self, state_dict, config): ...

    @hookimpl
    def register_architectures(register):
        register(MyAdapter.model_type, MyAdapter)
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch

from ..errors import HFFormatError
from ..model import ModelConfig, Transformer
from ..registry import NoOptions, Registry
from ..tokenizer import Tokenizer
from .common import ConfigReader, check_architecture, load_into, read_config, read_state_dict
from .tokenizers import hf_tokenizer, write_tokenizer_files


class Adapter:
    """A Hugging Face architecture: its config.json, tensors and tokenizer to and from this toolkit's."""

    Options = NoOptions
    model_type: ClassVar[str] = ""  # config.json's "model_type", and the name it is registered under
    hf_class: ClassVar[str] = ""  # the transformers class that loads such a folder ("architectures" in config.json)
    # transformers' config-class defaults of the keys read (an absent key takes these; they must be transformers' own)
    defaults: ClassVar[dict] = {}
    # save_hf without an architecture tries the lowest first: the plainest layout that can express a model
    export_rank: ClassVar[int] = 100

    def __init__(self, opts=None):
        self.opts = opts

    # -- config.json <-> ModelConfig ------------------------------------------------------------
    def config_from_hf(self, hf: dict, *, dropout: float = 0.0, where: str = "config.json") -> ModelConfig:
        """The ModelConfig of a config.json (as a dict); HFFormatError naming any key it does not honour."""
        check_architecture(hf, self.model_type, [self.hf_class], where)
        r = ConfigReader(hf, where, self.defaults)
        config = self.read_config(r, dropout)
        r.finish()  # every key read, or harmless, or refused: nothing is silently ignored
        return config

    def read_config(self, r: ConfigReader, dropout: float) -> ModelConfig:
        """The ModelConfig, every key read through ``r`` (an unread key is refused after)."""
        raise NotImplementedError

    def config_to_hf(self, model: Transformer) -> dict:
        """The config.json of ``model``; HFFormatError saying what this architecture cannot express."""
        raise HFFormatError(f"architecture {self.model_type!r} can be imported but not exported")

    @property
    def exports(self) -> bool:
        return type(self).config_to_hf is not Adapter.config_to_hf

    # -- tensors ------------------------------------------------------------------------------------
    def state_dict_from_hf(self, hf_sd: dict[str, torch.Tensor], config: ModelConfig,
                           where: str = "weights") -> dict[str, torch.Tensor]:
        """HF tensors -> ours (load_into reports what does not fit)."""
        raise NotImplementedError

    def state_dict_to_hf(self, state_dict: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
        """Our tensors (weights, or their gradients) -> HF names; a tied head is left out."""
        raise NotImplementedError

    # -- tokenizer ----------------------------------------------------------------------------------
    def tokenizer_from_hf(self, folder: str | Path) -> Tokenizer | None:
        """The folder's tokenizer, or None if it has none."""
        return hf_tokenizer(folder)

    def tokenizer_to_hf(self, tokenizer: Tokenizer, folder: str | Path, max_len: int) -> dict:
        """Write the tokenizer's files; returns the config.json keys they set (bos/eos ids)."""
        return write_tokenizer_files(tokenizer, Path(folder), max_len)

    # -- whole folders ------------------------------------------------------------------------------
    def load(self, path: str | Path, *, dropout: float = 0.0, dtype: torch.dtype | None = None,
             registry: Registry | None = None) -> Transformer:
        """A Transformer (eval mode) with the weights of a local folder, every mismatch reported at once."""
        where = str(path)
        config = self.config_from_hf(read_config(path), dropout=dropout, where=f"{where}/config.json")
        sd = self.state_dict_from_hf(read_state_dict(path), config, where)
        model = Transformer(config, registry)
        load_into(model, sd, where)
        if dtype is not None:
            model.to(dtype)
        return model.eval()
