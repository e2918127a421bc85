"""Gemma 2 weights in and out of Hugging Face layout, checked against transformers' Gemma2ForCausalLM."""
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
GEMMA2 = adapter("gemma2")
V = 50
# 6 query heads (not a power of two) of width 12 (not hidden / heads = 8), a window shorter than the text
SMALL = dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=3, head_dim=12, num_hidden_layers=4,
             intermediate_size=40, vocab_size=V, max_position_embeddings=64, sliding_window=8,
             rope_theta=5000.0)
VARIANTS = {
    # GQA ratio 2; caps low enough to bite; q.k scaled by 10**-0.5, not head_dim**-0.5; tied head
    "gqa2-capped-scaled": dict(attn_logit_softcapping=1.0, final_logit_softcapping=2.0, query_pre_attn_scalar=10),
    # GQA ratio 3, heads 16 wide; no caps; exact GELU; untied head; layers local and global in HF's own order
    "gqa3-plain-untied": dict(num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, attn_logit_softcapping=None,
                              final_logit_softcapping=None, hidden_activation="gelu", tie_word_embeddings=False,
                              layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"]),
}
PAD = 0  # Gemma2Config's pad_token_id: its embedding row gets no gradient in HF (padding_idx)
IDX = tokens(V, (2, 32), PAD)


def random_hf_gemma2(**overrides):
    torch.manual_seed(0)
    return randomize(transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**{**SMALL, **overrides})))


@pytest.mark.parametrize("variant", VARIANTS)
def test_imported_gemma2_matches_transformers_logits_loss_and_gradients(tmp_path, variant):
    hf = random_hf_gemma2(**VARIANTS[variant])
    hf.save_pretrained(tmp_path)
    ours = GEMMA2.load(tmp_path)
    errs = compare_training_step(hf, ours, IDX, GEMMA2.state_dict_to_hf)
    assert max(errs.values()) < 1e-5, {k: e for k, e in errs.items() if e >= 1e-5}
    assert len(errs) == 2 + len(list(hf.parameters()))  # logits, loss and every parameter's gradient


def test_sliding_layers_are_hfs_even_layers_by_default():
    cfg = GEMMA2.config_from_hf({"model_type": "gemma2", **SMALL, "num_hidden_layers": 6})
    assert cfg.attention.kind == "sliding_window" and cfg.attention.options.window == 8
    assert cfg.layers["global"].at == "1::2" and cfg.layers["global"].attention.kind == "gqa"
    model = Transformer(cfg)
    assert [b.attn.window for b in model.transformer.h] == [8, None] * 3
    assert GEMMA2.config_to_hf(model)["layer_types"] == transformers.Gemma2Config(**{**SMALL, "num_hidden_layers": 6}).layer_types


def test_a_checkpoint_saved_by_transformers_4_loads_as_transformers_reads_it(tmp_path):
    # google/gemma-2-2b's config.json predates layer_types and rope_parameters: HF's defaults decide
    random_hf_gemma2(**VARIANTS["gqa2-capped-scaled"]).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    theta = cfg.pop("rope_parameters")["rope_theta"]
    del cfg["layer_types"]
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "rope_theta": theta, "hidden_act": "gelu_pytorch_tanh",
                                                      "cache_implementation": "hybrid"}))
    hf = transformers.Gemma2ForCausalLM.from_pretrained(tmp_path).eval()
    ours = GEMMA2.load(tmp_path)
    with torch.no_grad():
        assert rel_err(ours(IDX)[0], hf(IDX).logits) < 1e-5


def test_cached_greedy_generation_past_the_window_equals_transformers_uncached(tmp_path):
    hf = random_hf_gemma2(**VARIANTS["gqa2-capped-scaled"])
    hf.save_pretrained(tmp_path)
    ours = GEMMA2.load(tmp_path)
    prompt, n = IDX[:1, :5], 24  # 29 tokens: the local layers' window (8) slides 21 times
    want = hf.generate(prompt, max_new_tokens=n, do_sample=False, use_cache=False, eos_token_id=None, pad_token_id=PAD)
    got = ours.generate(prompt, n, temperature=0)  # through the KV cache, the local layers' kept to 8 keys
    assert torch.equal(got, want)
    assert ours.generate(prompt, n, temperature=0, use_cache=False).equal(want)


@pytest.mark.parametrize("variant", VARIANTS)
def test_exported_gemma2_loads_in_transformers_with_the_same_logits(tmp_path, variant):
    hf = random_hf_gemma2(**VARIANTS[variant])
    hf.save_pretrained(tmp_path / "in")
    ours = GEMMA2.load(tmp_path / "in")
    save_hf(ours, tmp_path / "out", "gemma2")
    back = transformers.Gemma2ForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert back.config.rope_parameters["rope_theta"] == 5000.0
    for key in ("layer_types", "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
                "hidden_activation", "head_dim", "num_key_value_heads", "tie_word_embeddings"):
        assert getattr(back.config, key) == getattr(hf.config, key), key
    with torch.no_grad():
        assert rel_err(back(IDX).logits, ours(IDX)[0]) < 1e-5
    assert GEMMA2.load(tmp_path / "out").config == ours.config


# the config.json of google/gemma-2-2b as published (transformers 4.42 wrote it: no layer_types, rope_theta)
GEMMA2_2B = {
    "architectures": ["Gemma2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": 1,
    "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304, "initializer_range": 0.02,
    "intermediate_size": 9216, "max_position_embeddings": 8192, "model_type": "gemma2", "num_attention_heads": 8,
    "num_hidden_layers": 26, "num_key_value_heads": 4, "pad_token_id": 0, "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096, "torch_dtype": "float32",
    "transformers_version": "4.42.4", "use_cache": True, "vocab_size": 256000,
}


def test_published_gemma2_2b_config_maps_to_the_recipes_model():
    cfg = GEMMA2.config_from_hf(GEMMA2_2B)
    assert (cfg.n_embd, cfg.n_head, cfg.head_dim, cfg.n_layer, cfg.block_size) == (2304, 8, 256, 26, 8192)
    assert cfg.embedding_multiplier == 48.0 and cfg.logit_softcap == 30.0
    assert cfg.attention.options.scale is None  # query_pre_attn_scalar == head_dim: the plain 1/sqrt(256)
    recipe = load_recipe(RECIPES / "gemma2-2b.toml")
    assert recipe.model == cfg


def test_gemma2_27b_scale_comes_from_query_pre_attn_scalar():
    cfg = GEMMA2.config_from_hf({**GEMMA2_2B, "hidden_size": 4608, "head_dim": 128, "num_attention_heads": 32,
                                 "query_pre_attn_scalar": 144})
    assert cfg.attention.options.scale == 144**-0.5 and cfg.layers["global"].attention.options.scale == 144**-0.5


@pytest.mark.parametrize("change, message", [
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_type 'linear' (scaled RoPE) is not supported"),
    (dict(rope_scaling={"rope_theta": 10000.0}, rope_parameters={"rope_theta": 5000.0}),
     "rope_scaling and rope_parameters disagree on rope_theta (10000.0 vs 5000.0)"),
    (dict(attention_bias=True), "attention_bias is not supported"),
    (dict(hidden_activation="silu"), "hidden_activation 'silu' is not supported"),
    (dict(use_bidirectional_attention=True), "use_bidirectional_attention is not supported"),
    (dict(sliding_window=None), "sliding_window must be a positive integer for the sliding layers"),
    (dict(layer_types=["sliding_attention"] * 3), "layer_types must list 26 of"),
    (dict(quantization_config={"quant_method": "gptq"}), 'quantization_config = {"quant_method": "gptq"} is not supported'),
    (dict(alt_up_dim=4), "alt_up_dim = 4 is not supported by this importer"),
    (dict(model_type="gemma3_text"), "model_type 'gemma3_text' is not 'gemma2'"),
])
def test_gemma2_configs_we_cannot_represent_are_refused_naming_the_key(tmp_path, change, message):
    (tmp_path / "config.json").write_text(json.dumps({**GEMMA2_2B, **change}))
    with pytest.raises(HFFormatError, match=re.escape(message)):
        GEMMA2.load(tmp_path)


@pytest.mark.parametrize("change, reason", [
    (dict(block="pre_norm"), "block 'pre_norm' (Gemma 2 has 'sandwich')"),
    (dict(embedding_multiplier=None), "embedding_multiplier None (Gemma 2 multiplies by sqrt(n_embd) = 8)"),
    (dict(norm={"kind": "rmsnorm", "offset": 0.0}), "rmsnorm offset 0.0 (Gemma 2 scales by 1 + weight)"),
    (dict(attention={"kind": "gqa", "n_kv_head": 2, "scale": 0.3}), "attention scale 0.3"),
    (dict(layers={"g": {"at": "1::2", "attention": {"kind": "gqa", "n_kv_head": 1}}}), "attention options differ"),
    (dict(layers={"g": {"at": "1::2", "position": "none"}}), "layers with their own block, norm, MLP or position"),
])
def test_models_gemma2_cannot_express_are_refused_with_the_reason(tmp_path, change, reason):
    fields = dict(vocab_size=V, block_size=32, n_layer=2, n_head=4, n_embd=64, bias=False, block="sandwich",
                  norm={"kind": "rmsnorm", "offset": 1.0}, position="rope", mlp="geglu", embedding_multiplier=8.0,
                  attention={"kind": "gqa", "n_kv_head": 2})
    ours = Transformer(model_config({**fields, **change}))
    with pytest.raises(HFFormatError, match=re.escape("cannot export as Gemma 2: unsupported " + reason)):
        save_hf(ours, tmp_path, "gemma2")
    assert not (tmp_path / "model.safetensors").exists()


def test_a_config_built_here_round_trips_through_hf_layout_exactly(tmp_path):
    torch.manual_seed(0)
    cfg = model_config(dict(vocab_size=V, block_size=32, n_layer=3, n_head=3, n_embd=24, head_dim=16, bias=False,
                            embedding_multiplier=24**0.5, logit_softcap=20.0, block="sandwich",
                            norm={"kind": "rmsnorm", "eps": 1e-6, "offset": 1.0}, position="rope",
                            mlp={"kind": "geglu", "hidden_dim": 40, "approximate": "tanh"},
                            attention={"kind": "sliding_window", "window": 4, "n_kv_head": 1, "softcap": 40.0},
                            layers={"global": {"at": [1], "attention": {"kind": "gqa", "n_kv_head": 1, "softcap": 40.0}}}))
    ours = Transformer(cfg)
    save_hf(ours, tmp_path, "gemma2")
    again = GEMMA2.load(tmp_path)
    assert again.config == cfg
    for (name, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
