"""GPT-NeoX / Pythia weights in and out of Hugging Face layout, checked against transformers' GPTNeoXForCausalLM."""
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

from hf_parity import compare_training_step, randomize, rel_err, tokens  # noqa: E402
from toolkit.hf import HFFormatError, adapter, save_hf  # noqa: E402
from toolkit.hf.parts import model_config  # noqa: E402
from toolkit.model import Transformer  # noqa: E402
from toolkit.recipe import load_recipe  # noqa: E402

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
NEOX = adapter("gpt_neox")
V = 50
# 6 heads (not a power of two) of 16 dimensions, a quarter of which rotate (Pythia's rotary_pct)
SMALL = dict(hidden_size=96, num_attention_heads=6, num_hidden_layers=2, intermediate_size=80, vocab_size=V,
             max_position_embeddings=64, rotary_pct=0.25, rotary_emb_base=5000)
VARIANTS = {
    "parallel-gelu": dict(use_parallel_residual=True, hidden_act="gelu"),  # Pythia's
    "sequential-tanh-half-rotary-tied": dict(use_parallel_residual=False, hidden_act="gelu_new", rotary_pct=0.5,
                                             tie_word_embeddings=True),
}
IDX = tokens(V, (2, 32), None)  # GPT-NeoX's embedding has no padding_idx


def in_memory_names(tensors, config):
    """The exporter's HF names, with the head as transformers 5 names it in memory (lm_head; embed_out on disk)."""
    return {("lm_head.weight" if k == "embed_out.weight" else k): t for k, t in NEOX.state_dict_to_hf(tensors, config).items()}


def random_hf_neox(**overrides):
    torch.manual_seed(0)
    return randomize(transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**{**SMALL, **overrides})))


@pytest.mark.parametrize("variant", VARIANTS)
def test_imported_gpt_neox_matches_transformers_logits_loss_and_gradients(tmp_path, variant):
    hf = random_hf_neox(**VARIANTS[variant])
    hf.save_pretrained(tmp_path)
    ours = NEOX.load(tmp_path)
    parallel = VARIANTS[variant]["use_parallel_residual"]
    assert ours.config.block.kind == ("parallel" if parallel else "pre_norm")
    errs = compare_training_step(hf, ours, IDX, in_memory_names)
    assert max(errs.values()) < 1e-5, {k: e for k, e in errs.items() if e >= 1e-5}
    assert len(errs) == 2 + len(list(hf.parameters()))


def test_query_key_value_rows_are_regrouped_from_per_head_to_q_k_v(tmp_path):
    hf = random_hf_neox()
    hf.save_pretrained(tmp_path)
    ours = NEOX.load(tmp_path)
    theirs = hf.gpt_neox.layers[0].attention.query_key_value.weight.view(6, 3, 16, 96)  # (heads, q/k/v, hs, C)
    mine = ours.transformer.h[0].attn.c_attn.weight.view(3, 6, 16, 96)  # (q/k/v, heads, hs, C)
    assert torch.equal(mine[1, 4], theirs[4, 1])  # head 4's keys


def test_cached_greedy_generation_equals_transformers_uncached(tmp_path):
    hf = random_hf_neox()
    hf.save_pretrained(tmp_path)
    ours = NEOX.load(tmp_path)
    prompt, n = IDX[:1, :5], 16
    want = hf.generate(prompt, max_new_tokens=n, do_sample=False, use_cache=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, n, temperature=0), want)


@pytest.mark.parametrize("variant", VARIANTS)
def test_exported_gpt_neox_loads_in_transformers_with_the_same_logits(tmp_path, variant):
    hf = random_hf_neox(**VARIANTS[variant])
    hf.save_pretrained(tmp_path / "in")
    ours = NEOX.load(tmp_path / "in")
    save_hf(ours, tmp_path / "out", "gpt_neox")
    back = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert back.config.use_parallel_residual == hf.config.use_parallel_residual
    assert back.config.rope_parameters == hf.config.rope_parameters  # theta 5000, the rotary fraction
    with torch.no_grad():
        assert rel_err(back(IDX).logits, ours(IDX)[0]) < 1e-5
    assert NEOX.load(tmp_path / "out").config == ours.config


# EleutherAI/pythia-160m's config.json as published (transformers 4.24 wrote it)
PYTHIA_160M = {
    "architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "gelu",
    "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 2048, "model_type": "gpt_neox", "num_attention_heads": 12, "num_hidden_layers": 12,
    "rotary_emb_base": 10000, "rotary_pct": 0.25, "tie_word_embeddings": False, "torch_dtype": "float16",
    "transformers_version": "4.24.0", "use_cache": True, "use_parallel_residual": True, "vocab_size": 50304,
}


def test_an_original_pythia_checkpoint_loads_as_transformers_reads_it(tmp_path):
    # Pythia's own files: rotary_pct / rotary_emb_base, fp16, and the mask and inv_freq buffers in the weights
    hf = random_hf_neox()
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    legacy = {k: cfg[k] for k in PYTHIA_160M if k in cfg and k not in ("torch_dtype", "transformers_version")}
    (tmp_path / "config.json").write_text(json.dumps({**legacy, "rotary_pct": rope["partial_rotary_factor"],
                                                      "rotary_emb_base": rope["rope_theta"], "torch_dtype": "float16"}))
    sd = {k: v.half() for k, v in load_file(tmp_path / "model.safetensors").items()}
    for i in range(SMALL["num_hidden_layers"]):
        sd[f"gpt_neox.layers.{i}.attention.bias"] = torch.tril(torch.ones(64, 64, dtype=torch.bool)).view(1, 1, 64, 64)
        sd[f"gpt_neox.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
        sd[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = torch.ones(2)
    save_file(sd, tmp_path / "model.safetensors")
    hf = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ours = NEOX.load(tmp_path)
    assert ours.config.position.options.fraction == 0.25 and ours.config.position.options.theta == 5000.0
    with torch.no_grad():
        assert rel_err(ours(IDX)[0], hf(IDX).logits) < 1e-5


def test_published_pythia_160m_config_maps_to_the_recipes_model():
    cfg = NEOX.config_from_hf(PYTHIA_160M)
    assert (cfg.block.kind, cfg.block.options.shared_norm) == ("parallel", False)
    assert cfg.position.options.fraction == 0.25 and cfg.mlp.options.approximate == "none"
    recipe = load_recipe(RECIPES / "pythia-160m.toml")
    assert recipe.model == cfg


@pytest.mark.parametrize("change, message", [
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_type 'linear' (scaled RoPE) is not supported"),
    (dict(attention_bias=False), "attention_bias = false is not supported"),
    (dict(hidden_act="silu"), "hidden_act 'silu' is not supported"),
    (dict(rotary_pct=0.3), "rotary_pct 0.3 rotates 19 of 64 head dimensions"),
    (dict(use_flash_attn=True, multiple_of=256), "use_flash_attn = true is not supported by this importer"),
    (dict(model_type="gptj"), "model_type 'gptj' is not 'gpt_neox'"),
])
def test_gpt_neox_configs_we_cannot_represent_are_refused_naming_the_key(tmp_path, change, message):
    (tmp_path / "config.json").write_text(json.dumps({**PYTHIA_160M, **change}))
    with pytest.raises(HFFormatError, match=re.escape(message)):
        NEOX.load(tmp_path)


@pytest.mark.parametrize("change, reason", [
    (dict(block="parallel"), "a parallel block with one shared norm (GPT-NeoX has one per branch)"),
    (dict(block="sandwich"), "block 'sandwich' (GPT-NeoX has 'parallel' or 'pre_norm')"),
    (dict(bias=False), "no biases"),
    (dict(position={"kind": "alibi"}), "position 'alibi' (GPT-NeoX has 'rope')"),
])
def test_models_gpt_neox_cannot_express_are_refused_with_the_reason(tmp_path, change, reason):
    fields = dict(vocab_size=V, block_size=32, n_layer=2, n_head=4, n_embd=64, tie_embeddings=False,
                  block={"kind": "parallel", "shared_norm": False}, norm="layernorm",
                  position={"kind": "rope", "fraction": 0.25}, mlp="gelu", attention="mha")
    ours = Transformer(model_config({**fields, **change}))
    with pytest.raises(HFFormatError, match=re.escape("cannot export as GPT-NeoX: unsupported " + reason)):
        save_hf(ours, tmp_path, "gpt_neox")
    assert not (tmp_path / "model.safetensors").exists()
