"""A Hugging Face architecture added by a plugin file, without touching toolkit/: registered through
``register_architectures`` like the built-ins, listed by ``playattention plugins architecture``, and
converted both ways (HF folder -> run folder -> HF folder) with every tensor unchanged."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from toolkit.cli import main
from toolkit.convert import hf_to_run, run_to_hf
from toolkit.generate import load_run
from toolkit.hf import HFFormatError, adapter, architectures, hf_model_config
from toolkit.hf.tokenizers import char_tokenizer_json
from toolkit.inspection import build_meta_model
from toolkit.model import Transformer
from toolkit.plugin_manager import load_registry
from toolkit.recipe import load_recipe
from toolkit.tokenizer import CharTokenizer

# GPT-2's layout under another model_type, other config keys and other tensor names
PLUGIN = '''
"""TinyGPT: a made-up architecture, GPT-2's layout with names of its own (a playattention plugin)."""
from toolkit.hf import Adapter, HFFormatError
from toolkit.hookspecs import hookimpl
from toolkit.model import ModelConfig

# our tensor-name prefix -> theirs
PREFIXES = {"transformer.wte.": "embed.tokens.", "transformer.wpe.": "embed.positions.", "transformer.h.": "blocks.",
            "transformer.ln_f.": "final_norm.", "lm_head.": "head."}


def rename(name, table):
    prefix = next(p for p in table if name.startswith(p))
    return table[prefix] + name[len(prefix):]


class TinyGPTAdapter(Adapter):
    """TinyGPT, GPT-2 renamed (a test architecture)."""

    model_type, hf_class = "tiny_gpt", "TinyGPTForCausalLM"
    defaults = {"norm_eps": 1e-5}

    def read_config(self, r, dropout):
        return ModelConfig(vocab_size=r.need("vocab"), block_size=r.need("context"), n_layer=r.need("layers"),
                           n_head=r.need("heads"), n_embd=r.need("width"), dropout=dropout, bias=True,
                           tie_embeddings=False, norm={"kind": "layernorm", "eps": r.need("norm_eps", float)})

    def state_dict_from_hf(self, hf_sd, config, where="weights"):
        back = {theirs: ours for ours, theirs in PREFIXES.items()}
        return {rename(name, back): t for name, t in hf_sd.items()}

    def config_to_hf(self, model):
        cfg = model.config
        if (cfg.attention.kind, cfg.norm.kind, cfg.position.kind, cfg.mlp.kind) != ("mha", "layernorm", "learned", "gelu"):
            raise HFFormatError("cannot export as tiny_gpt: not GPT-2's parts")
        return {"model_type": self.model_type, "architectures": [self.hf_class], "vocab": cfg.vocab_size,
                "context": cfg.block_size, "layers": cfg.n_layer, "heads": cfg.n_head, "width": cfg.n_embd,
                "norm_eps": cfg.norm.options.eps}

    def state_dict_to_hf(self, state_dict, config):
        return {rename(name, PREFIXES): t for name, t in state_dict.items()}


@hookimpl
def register_architectures(register):
    register(TinyGPTAdapter.model_type, TinyGPTAdapter)
'''
TEXT = "the quick brown fox jumps over the lazy dog\n"
RECIPES = Path(__file__).resolve().parent.parent / "recipes"
#: a shipped recipe of each built-in architecture
BUILT_IN = {"gpt2": "gpt2", "llama": "llama-cpu", "mistral": "mistral-cpu", "mixtral": "mixtral-cpu",
            "qwen3": "qwen3-cpu", "gemma2": "gemma2-cpu", "olmo2": "olmo2-cpu", "gpt_neox": "pythia-cpu"}


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a plugin file of the current project runs without --trust-plugins
    (tmp_path / "tiny_gpt.py").write_text(PLUGIN)
    return "tiny_gpt.py"


def tiny_folder(folder, vocab: int) -> dict:
    """A random-weight TinyGPT folder written by hand (config.json, model.safetensors, tokenizer.json)."""
    C, L, T = 16, 2, 8
    shapes = {"embed.tokens.weight": (vocab, C), "embed.positions.weight": (T, C), "head.weight": (vocab, C),
              "final_norm.weight": (C,), "final_norm.bias": (C,)}
    for i in range(L):
        shapes.update({f"blocks.{i}.ln_1.weight": (C,), f"blocks.{i}.ln_1.bias": (C,),
                       f"blocks.{i}.ln_2.weight": (C,), f"blocks.{i}.ln_2.bias": (C,),
                       f"blocks.{i}.attn.c_attn.weight": (3 * C, C), f"blocks.{i}.attn.c_attn.bias": (3 * C,),
                       f"blocks.{i}.attn.c_proj.weight": (C, C), f"blocks.{i}.attn.c_proj.bias": (C,),
                       f"blocks.{i}.mlp.c_fc.weight": (4 * C, C), f"blocks.{i}.mlp.c_fc.bias": (4 * C,),
                       f"blocks.{i}.mlp.c_proj.weight": (C, 4 * C), f"blocks.{i}.mlp.c_proj.bias": (C,)})
    gen = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "tiny_gpt", "architectures": ["TinyGPTForCausalLM"],
                                                    "vocab": vocab, "context": T, "layers": L, "heads": 2, "width": C}))
    return tensors


@pytest.mark.slow
def test_a_plugin_file_registers_an_architecture_that_converts_both_ways(tmp_path, plugin, capsys):
    assert main(["plugins", "architecture", "--plugin", plugin]) == 0
    listing = capsys.readouterr().out
    assert "tiny_gpt" in listing and "TinyGPT, GPT-2 renamed" in listing and "llama" in listing
    tok = CharTokenizer.from_text(TEXT)
    tensors = tiny_folder(tmp_path / "hf", tok.vocab_size)
    (tmp_path / "hf" / "tokenizer.json").write_text(json.dumps(char_tokenizer_json(tok)))
    with pytest.raises(HFFormatError, match="model_type 'tiny_gpt' .* is not supported; supported: gpt2, llama"):
        hf_model_config(tmp_path / "hf")  # without the plugin
    registry = load_registry([plugin])

    summary = hf_to_run(tmp_path / "hf", tmp_path / "run", registry=registry)
    assert (summary["architecture"], summary["hf_class"]) == ("tiny_gpt", "TinyGPTForCausalLM")
    model, _, _ = load_run(tmp_path / "run")
    ours = model.state_dict()
    assert torch.equal(ours["transformer.h.1.attn.c_attn.weight"], tensors["blocks.1.attn.c_attn.weight"])
    assert torch.equal(ours["lm_head.weight"], tensors["head.weight"])

    out = run_to_hf(tmp_path / "run", tmp_path / "back", model_type="tiny_gpt", registry=registry)
    assert out["architecture"] == "tiny_gpt"
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert set(back) == set(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert (config["model_type"], config["vocab"], config["width"]) == ("tiny_gpt", tok.vocab_size, 16)


def test_a_plugin_architectures_config_key_it_does_not_read_is_refused_naming_it_and_the_file(tmp_path, plugin):
    tiny_folder(tmp_path / "hf", 20)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "rotary": True}))
    with pytest.raises(HFFormatError) as exc:
        hf_model_config(tmp_path / "hf", registry=load_registry([plugin]))
    assert str(exc.value) == (f"{tmp_path / 'hf'}/config.json: rotary = true is not supported by this importer "
                              f"(refused rather than risk wrong numbers)")


def test_the_built_in_architectures_register_like_any_plugin():
    assert [a.model_type for a in architectures()] == list(BUILT_IN)  # in the order save_hf tries them
    assert all(a.exports for a in architectures())
    # plugins/architectures.py names them without importing them: each under its own adapter's model_type
    assert [adapter(model_type).model_type for model_type in BUILT_IN] == list(BUILT_IN)


@pytest.mark.parametrize("model_type", BUILT_IN)
def test_each_built_in_reads_back_what_it_writes_and_refuses_a_key_it_does_not_read(model_type):
    """One config reader for all: whatever config.json an adapter writes, it reads; one key more is refused."""
    ad = adapter(model_type)
    config = ad.config_to_hf(build_meta_model(load_recipe(RECIPES / f"{BUILT_IN[model_type]}.toml")))
    with torch.device("meta"):
        again = Transformer(ad.config_from_hf(config))
    assert ad.config_to_hf(again) == config
    with pytest.raises(HFFormatError, match=r"^config\.json: not_a_setting = 2 is not supported by this importer"):
        ad.config_from_hf({**config, "not_a_setting": 2})


@pytest.mark.slow
def test_convert_generate_and_eval_read_and_write_a_plugin_architecture_given_with_plugin(tmp_path, plugin, capsys):
    tok = CharTokenizer.from_text(TEXT)
    tiny_folder(tmp_path / "hf", tok.vocab_size)
    (tmp_path / "hf" / "tokenizer.json").write_text(json.dumps(char_tokenizer_json(tok)))
    (tmp_path / "heldout.txt").write_text(TEXT * 4)
    assert main(["convert", "hf", "run"]) == 2  # without the plugin: not supported, in one line
    assert "model_type 'tiny_gpt'" in capsys.readouterr().err
    assert main(["convert", "hf", "run", "--plugin", plugin]) == 0
    assert main(["convert", "run", "back", "--to", "hf", "--arch", "tiny_gpt", "--plugin", plugin]) == 0
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == "tiny_gpt"
    capsys.readouterr()
    assert main(["generate", "back", "--plugin", plugin, "--prompt", "the", "--max-new-tokens", "4",
                 "--temperature", "0", "--device", "cpu"]) == 0
    assert "the" in capsys.readouterr().out
    assert main(["eval", "back", "--plugin", plugin, "--task", "perplexity:path=heldout.txt", "--device", "cpu"]) == 0
    assert "perplexity" in capsys.readouterr().out
