"""OLMo 2 weights in and out of Hugging Face layout, checked against transformers' Olmo2ForCausalLM."""
import json
import re
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

from hf_parity import compare_training_step, randomize, rel_err, tokens  # noqa: E402
from toolkit.hf import HFFormatError, adapter, save_hf  # noqa: E402
from toolkit.hf.parts import model_config  # noqa: E402
from toolkit.model import Transformer  # noqa: E402
from toolkit.recipe import load_recipe  # noqa: E402

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
OLMO2 = adapter("olmo2")
V = 50
# 6 query heads (not a power of two); eps 1e-6, not the norm's default, so a q/k norm without the model's eps shows
SMALL = dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=3, num_hidden_layers=3, intermediate_size=40,
             vocab_size=V, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=5000.0)
VARIANTS = {
    "gqa2": dict(),  # GQA ratio 2, untied head (OLMo 2's)
    "gqa3-wide-heads-tied": dict(num_key_value_heads=2, head_dim=12, tie_word_embeddings=True),  # 12 != 48 / 6
}
PAD = 1  # Olmo2Config's pad_token_id: its embedding row gets no gradient in HF (padding_idx)
IDX = tokens(V, (2, 32), PAD)


def random_hf_olmo2(**overrides):
    torch.manual_seed(0)
    return randomize(transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**{**SMALL, **overrides})))


@pytest.mark.parametrize("variant", VARIANTS)
def test_imported_olmo2_matches_transformers_logits_loss_and_gradients(tmp_path, variant):
    hf = random_hf_olmo2(**VARIANTS[variant])
    hf.save_pretrained(tmp_path)
    ours = OLMO2.load(tmp_path)
    attn = ours.transformer.h[0].attn
    assert attn.q_norm.weight.shape == (6 * attn.head_dim,) and attn.q_norm.eps == 1e-6  # over all heads at once
    errs = compare_training_step(hf, ours, IDX, OLMO2.state_dict_to_hf)
    assert max(errs.values()) < 1e-5, {k: e for k, e in errs.items() if e >= 1e-5}
    assert len(errs) == 2 + len(list(hf.parameters()))


def test_cached_greedy_generation_equals_transformers_uncached(tmp_path):
    hf = random_hf_olmo2(**VARIANTS["gqa3-wide-heads-tied"])
    hf.save_pretrained(tmp_path)
    ours = OLMO2.load(tmp_path)
    prompt, n = IDX[:1, :5], 16
    want = hf.generate(prompt, max_new_tokens=n, do_sample=False, use_cache=False, eos_token_id=None, pad_token_id=PAD)
    assert torch.equal(ours.generate(prompt, n, temperature=0), want)


@pytest.mark.parametrize("variant", VARIANTS)
def test_exported_olmo2_loads_in_transformers_with_the_same_logits(tmp_path, variant):
    hf = random_hf_olmo2(**VARIANTS[variant])
    hf.save_pretrained(tmp_path / "in")
    ours = OLMO2.load(tmp_path / "in")
    save_hf(ours, tmp_path / "out", "olmo2")
    back = transformers.Olmo2ForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert back.config.tie_word_embeddings == hf.config.tie_word_embeddings
    assert back.config.rope_parameters["rope_theta"] == 5000.0
    assert back.model.layers[0].self_attn.head_dim == hf.model.layers[0].self_attn.head_dim
    with torch.no_grad():
        assert rel_err(back(IDX).logits, ours(IDX)[0]) < 1e-5
    assert OLMO2.load(tmp_path / "out").config == ours.config


# allenai/OLMo-2-1124-7B's config.json as published
OLMO2_7B = {
    "architectures": ["Olmo2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "eos_token_id": 100257,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008,
    "max_position_embeddings": 4096, "model_type": "olmo2", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 32, "pad_token_id": 100277, "rms_norm_eps": 1e-06, "rope_scaling": None,
    "rope_theta": 500000, "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.47.0.dev0",
    "use_cache": True, "vocab_size": 100352,
}


def test_published_olmo2_7b_config_maps_to_the_recipes_model():
    cfg = OLMO2.config_from_hf(OLMO2_7B)
    assert (cfg.block.kind, cfg.block.options.pre, cfg.block.options.post) == ("sandwich", False, True)
    assert (cfg.attention.options.qk_norm, cfg.attention.options.qk_norm_scope) == ("rmsnorm", "all")
    assert cfg.position.options.theta == 500000.0 and not cfg.tie_embeddings and not cfg.bias
    recipe = load_recipe(RECIPES / "olmo2-7b.toml")
    assert recipe.model == cfg


@pytest.mark.parametrize("change, message", [
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_type 'yarn' (scaled RoPE) is not supported"),
    (dict(attention_bias=True), "attention_bias is not supported"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    (dict(clip_qkv=8.0), "clip_qkv = 8.0 is not supported by this importer"),
    (dict(model_type="olmo"), "model_type 'olmo' is not 'olmo2'"),
])
def test_olmo2_configs_we_cannot_represent_are_refused_naming_the_key(tmp_path, change, message):
    (tmp_path / "config.json").write_text(json.dumps({**OLMO2_7B, **change}))
    with pytest.raises(HFFormatError, match=re.escape(message)):
        OLMO2.load(tmp_path)


@pytest.mark.parametrize("change, reason", [
    (dict(block="pre_norm"), "block 'pre_norm' (OLMo 2 has 'sandwich')"),
    (dict(block={"kind": "sandwich", "pre": True}), "sandwich blocks with input norms"),
    (dict(attention={"kind": "gqa", "n_kv_head": 2, "qk_norm": "rmsnorm"}), "qk_norm 'rmsnorm' over 'head'"),
    (dict(bias=True), "biases (OLMo 2 has none)"),
])
def test_models_olmo2_cannot_express_are_refused_with_the_reason(tmp_path, change, reason):
    fields = dict(vocab_size=V, block_size=32, n_layer=2, n_head=4, n_embd=64, bias=False, tie_embeddings=False,
                  block={"kind": "sandwich", "pre": False}, norm="rmsnorm", position="rope", mlp="swiglu",
                  attention={"kind": "gqa", "n_kv_head": 2, "qk_norm": "rmsnorm", "qk_norm_scope": "all"})
    ours = Transformer(model_config({**fields, **change}))
    with pytest.raises(HFFormatError, match=re.escape("cannot export as OLMo 2: unsupported " + reason)):
        save_hf(ours, tmp_path, "olmo2")
    assert not (tmp_path / "model.safetensors").exists()
