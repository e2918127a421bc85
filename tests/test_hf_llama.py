"""Llama weights from Hugging Face layout into rmsnorm + rope + swiglu + gqa, checked against LlamaForCausalLM."""
import json
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

from toolkit.hf import HFFormatError, adapter  # noqa: E402

LLAMA = adapter("llama")
SMALL = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, intermediate_size=96,
             vocab_size=100, max_position_embeddings=32, rms_norm_eps=1e-6, rope_theta=500000.0)
IDX = torch.randint(0, 100, (2, 32), generator=torch.Generator().manual_seed(1))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def random_hf_llama(**overrides):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**SMALL, **overrides})).eval()
    with torch.no_grad():  # norms too, so a swapped input/post-attention norm shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("overrides", [
    dict(),  # grouped-query: 4 query heads share 2 key/value heads
    dict(num_key_value_heads=1, tie_word_embeddings=True, rope_theta=10000.0),  # multi-query, tied head
], ids=["gqa", "mqa-tied"])
def test_imported_llama_matches_transformers_logits(tmp_path, overrides):
    hf = random_hf_llama(**overrides)
    hf.save_pretrained(tmp_path)
    ours = LLAMA.load(tmp_path)
    cfg = ours.config
    assert (cfg.attention.kind, cfg.norm.kind, cfg.position.kind, cfg.mlp.kind) == ("gqa", "rmsnorm", "rope", "swiglu")
    assert cfg.bias is False and cfg.tie_embeddings == overrides.get("tie_word_embeddings", False)
    with torch.no_grad():
        want = hf(IDX).logits
        assert rel_err(ours(IDX)[0], want) < 1e-5


def test_imported_llama_greedy_generation_matches_transformers(tmp_path):
    hf = random_hf_llama()
    hf.save_pretrained(tmp_path)
    ours = LLAMA.load(tmp_path)
    prompt = IDX[:1, :6]
    want = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, 12, temperature=0), want)


def test_config_mapping_follows_hf_names():
    cfg = LLAMA.config_from_hf({"model_type": "llama", **SMALL, "rope_theta": None,
                                "rope_parameters": {"rope_type": "default", "rope_theta": 1234.0}})
    assert (cfg.n_embd, cfg.n_head, cfg.n_layer, cfg.block_size, cfg.vocab_size) == (64, 4, 2, 32, 100)
    assert cfg.attention.options == {"n_kv_head": 2} and cfg.mlp.options == {"hidden_dim": 96}
    assert cfg.norm.options == {"eps": 1e-6} and cfg.position.options == {"theta": 1234.0}
    old_style = LLAMA.config_from_hf({"model_type": "llama", **SMALL})  # transformers 4: top-level rope_theta
    assert old_style.position.options == {"theta": 500000.0} and not old_style.tie_embeddings


def test_rope_scaling_and_rope_parameters_together_must_agree():
    """Both given: one table (transformers reads rope_scaling); a setting they disagree on is refused, not picked."""
    linear = {"rope_type": "linear", "factor": 2.0}
    both = LLAMA.config_from_hf({"model_type": "llama", **SMALL, "rope_scaling": {"type": "linear", "factor": 2.0},
                                 "rope_parameters": {**linear, "rope_theta": 1234.0}})
    assert both.position.options == {"theta": 1234.0, "scaling": "linear", "factor": 2.0}
    with pytest.raises(HFFormatError, match=re.escape("config.json: rope_scaling and rope_parameters disagree on "
                                                      "factor (2.0 vs 4.0)")):
        LLAMA.config_from_hf({"model_type": "llama", **SMALL, "rope_scaling": linear,
                              "rope_parameters": {**linear, "factor": 4.0}})


@pytest.mark.parametrize("change, message", [
    (dict(rope_scaling={"rope_type": "longrope", "factor": 8.0}), "rope_scaling.rope_type 'longrope' is not supported"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope_scaling.low_freq_factor is required"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0, "beta_fast": 3}),
     "rope_scaling.beta_fast is not supported with rope_type 'linear'"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor = 0.5 is not supported"),
    (dict(attention_bias=True), "attention_bias = true is not supported"),
    (dict(mlp_bias=True), "mlp_bias = true is not supported"),
    (dict(hidden_act="gelu"), 'hidden_act = "gelu" is not supported'),
    (dict(quantization_config={"quant_method": "gptq"}), "quantization_config = "),
    (dict(sliding_window=8), "sliding_window = 8 is not supported by this importer"),
    (dict(num_key_value_heads=3), "num_key_value_heads (3) must divide num_attention_heads (4)"),
    (dict(model_type="gpt2"), "model_type 'gpt2' is not 'llama'"),
])
def test_llama_configs_we_cannot_represent_are_refused(tmp_path, change, message):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **SMALL, **change}))
    with pytest.raises(HFFormatError, match=message.replace("(", r"\(").replace(")", r"\)")):
        LLAMA.load(tmp_path)


def test_a_missing_projection_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    random_hf_llama().save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(HFFormatError, match=r"layer 1 lacks mlp\.up_proj\.weight"):
        LLAMA.load(tmp_path)
