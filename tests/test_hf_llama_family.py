"""Llama (plain and with scaled RoPE), Mistral, Mixtral and Qwen 3 folders in and out, checked against transformers.

Each case is a small random transformers model with odd shapes (6 query heads: not a power of two;
GQA ratios 2 and 3; head_dim != hidden_size / heads where the architecture has head_dim), saved
with save_pretrained, imported through the registered architectures, and compared in fp32: logits, loss, every
gradient, greedy generation; then exported back and loaded by transformers.
"""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

from toolkit.hf import HFFormatError, architectures, hf_model_config, load_hf, save_hf  # noqa: E402
from toolkit.hf.llama import LlamaAdapter, MistralAdapter, MixtralAdapter, Qwen3Adapter  # noqa: E402

V = 97
NO_SPECIAL = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)  # greedy decoding never stops early
BASE = dict(hidden_size=48, num_attention_heads=6, num_hidden_layers=2, intermediate_size=40, vocab_size=V,
            max_position_embeddings=64, rms_norm_eps=1e-6, **NO_SPECIAL)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
CASES = {
    # GQA ratio 2, head_dim 12 (hidden/heads is 8)
    "llama": ("LlamaConfig", dict(num_key_value_heads=3, head_dim=12, rope_parameters={"rope_theta": 5e5})),
    # multi-query, tied head, the heads' natural width
    "llama-mqa-tied": ("LlamaConfig", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "llama3-scaled": ("LlamaConfig", dict(num_key_value_heads=2, head_dim=16, rope_parameters=LLAMA3)),
    "llama-linear": ("LlamaConfig", dict(num_key_value_heads=3, rope_parameters={"rope_type": "linear", "factor": 4.0})),
    "llama-yarn": ("LlamaConfig", dict(num_key_value_heads=3, head_dim=16, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 16.0})),
    # dynamic NTK grows the base past max_position_embeddings (16): the tests run to 40
    "llama-dynamic": ("LlamaConfig", dict(num_key_value_heads=3, max_position_embeddings=16,
                                          rope_parameters={"rope_type": "dynamic", "factor": 4.0})),
    # GQA ratio 3, head_dim 10, a window of 5 keys
    "mistral": ("MistralConfig", dict(num_key_value_heads=2, head_dim=10, sliding_window=5)),
    "mixtral": ("MixtralConfig", dict(num_key_value_heads=2, num_local_experts=3, num_experts_per_tok=2,
                                      router_aux_loss_coef=0.02)),
    "mixtral-window": ("MixtralConfig", dict(num_key_value_heads=3, head_dim=10, num_local_experts=4,
                                             num_experts_per_tok=3, sliding_window=6)),
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=3, head_dim=12)),
    "qwen3-tied": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=4, tie_word_embeddings=True)),
}
IDX = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(1))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def random_hf(case: str):
    cls, overrides = CASES[case]
    torch.manual_seed(0)
    config = getattr(transformers, cls)(**{**BASE, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms too, so a swapped or mis-scaled norm shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """case -> (transformers model, folder it was saved in), built once per case."""
    cache = {}

    def get(case):
        if case not in cache:
            folder = tmp_path_factory.mktemp(case)
            hf = random_hf(case)
            hf.save_pretrained(folder)
            cache[case] = hf, folder
        return cache[case]

    return get


@pytest.mark.parametrize("case", CASES)
def test_imported_model_matches_transformers_logits_loss_and_every_gradient(saved, case):
    hf, folder = saved(case)
    ours = load_hf(folder)
    with torch.no_grad():
        assert rel_err(ours(IDX)[0], hf(IDX).logits) < 1e-5
    # the loss of predicting each next token (transformers shifts the labels itself)
    targets = torch.cat([IDX[:, 1:], torch.full((2, 1), -1)], dim=1)  # -1: nothing to predict after the last
    want = hf(IDX, labels=IDX).loss
    got = ours(IDX, targets)[1]
    assert abs(got.item() - want.item()) / want.item() < 1e-5
    want.backward()
    got.backward()
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    want_grads = LlamaAdapter().state_dict_from_hf(hf_grads, ours.config, "grads")  # fused the way the weights are
    ours_grads = dict(ours.named_parameters())
    assert set(want_grads) >= set(ours_grads)
    worst = max((rel_err(p.grad, want_grads[n]), n) for n, p in ours_grads.items())
    assert worst[0] < 1e-5, worst


@pytest.mark.parametrize("case", ["llama", "llama3-scaled", "mistral", "mixtral", "mixtral-window", "qwen3"])
def test_cached_greedy_generation_equals_transformers_uncached_greedy(saved, case):
    hf, folder = saved(case)
    ours = load_hf(folder)
    prompt = IDX[:1, :4]
    want = hf.generate(prompt, max_new_tokens=14, do_sample=False, use_cache=False, pad_token_id=0)
    got = ours.generate(prompt, 14, temperature=0)  # KV-cached; 18 tokens > the windows of 5 and 6
    assert torch.equal(got, want)


def test_dynamic_ntk_sizes_the_base_by_the_sequence_length(saved):
    hf, folder = saved("llama-dynamic")
    ours = load_hf(folder)
    assert ours.config.block_size == 64 and ours.config.position.options.original_max_len == 16
    with torch.no_grad():
        short, long = IDX[:, :12], IDX[:, :40]  # within max_position_embeddings, and 2.5 times past it
        assert rel_err(ours(short)[0], hf(short).logits) < 1e-5
        assert rel_err(ours(long)[0], hf(long).logits) < 1e-5
        # the base grew: the first 12 positions' logits in the long sequence differ from the short one's
        assert not torch.allclose(ours(long)[0][:, :12], ours(short)[0], atol=1e-4)
    # with a cache, each step rotates its keys by the base of its own length, as transformers' cache does
    prompt = IDX[:1, :6]
    want = hf.generate(prompt, max_new_tokens=20, do_sample=False, use_cache=True, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, 20, temperature=0), want)
    want = hf.generate(prompt, max_new_tokens=20, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, 20, temperature=0, use_cache=False), want)


@pytest.mark.parametrize("case", CASES)
def test_export_round_trips_through_transformers(saved, tmp_path, case):
    hf, folder = saved(case)
    ours = load_hf(folder)
    arch = save_hf(ours, tmp_path)
    assert arch.model_type == hf.config.model_type
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(back) is type(hf)
    with torch.no_grad():
        assert torch.equal(back(IDX).logits, hf(IDX).logits)
    assert load_hf(tmp_path).config == ours.config


def test_mixtral_routing_and_loss_weight_map_onto_the_moe_mlp(saved):
    _, folder = saved("mixtral")
    cfg = load_hf(folder).config  # options resolved
    assert cfg.mlp.kind == "moe"
    opts = cfg.mlp.options
    assert (opts.experts, opts.top_k, opts.load_balance, opts.router_z) == (3, 2, 0.02, 0.0)
    assert opts.expert.kind == "swiglu" and opts.expert.options.hidden_dim == 40


def test_mixtral_as_published_with_one_module_per_expert_loads(saved, tmp_path):
    """Mixtral checkpoints on the Hub name experts block_sparse_moe.experts.{e}.w1/w2/w3 (transformers 5 stacks them)."""
    from safetensors.torch import load_file, save_file

    hf, folder = saved("mixtral")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    sd = load_file(folder / "model.safetensors")
    legacy = {}
    for name, t in sd.items():
        name = name.replace(".mlp.gate.", ".block_sparse_moe.gate.")
        if name.endswith("mlp.experts.gate_up_proj"):
            gate, up = t.chunk(2, dim=1)  # (E, I, C) each
            for e in range(t.size(0)):
                legacy[name.replace("mlp.experts.gate_up_proj", f"block_sparse_moe.experts.{e}.w1.weight")] = gate[e]
                legacy[name.replace("mlp.experts.gate_up_proj", f"block_sparse_moe.experts.{e}.w3.weight")] = up[e]
        elif name.endswith("mlp.experts.down_proj"):
            for e in range(t.size(0)):
                legacy[name.replace("mlp.experts.down_proj", f"block_sparse_moe.experts.{e}.w2.weight")] = t[e]
        else:
            legacy[name] = t
    save_file({k: v.contiguous() for k, v in legacy.items()}, tmp_path / "model.safetensors")
    with torch.no_grad():
        assert rel_err(load_hf(tmp_path)(IDX)[0], hf(IDX).logits) < 1e-5


def test_qwen3_sliding_layers_become_a_layer_group(saved, tmp_path):
    config = transformers.Qwen3Config(**{**BASE, **CASES["qwen3"][1], "num_hidden_layers": 3}, use_sliding_window=True,
                                      sliding_window=4, max_window_layers=1)
    torch.manual_seed(0)
    hf = transformers.Qwen3ForCausalLM(config).eval()
    hf.save_pretrained(tmp_path)
    ours = load_hf(tmp_path)
    group = ours.config.layers["sliding"]
    assert group.at == [1, 2] and group.attention.kind == "sliding_window" and group.attention.options.window == 4
    with torch.no_grad():
        assert rel_err(ours(IDX)[0], hf(IDX).logits) < 1e-5


@pytest.mark.parametrize("fam, cls", [(LlamaAdapter, "LlamaConfig"), (MistralAdapter, "MistralConfig"),
                                      (MixtralAdapter, "MixtralConfig"), (Qwen3Adapter, "Qwen3Config")],
                         ids=lambda x: getattr(x, "model_type", x))
def test_defaults_of_absent_keys_are_transformers_own(fam, cls):
    """An absent config.json key means the config class's default: ours must be the same, or imports go wrong silently."""
    klass = getattr(transformers, cls)
    for key, ours in fam.defaults.items():
        theirs = klass.default_theta if key == "rope_theta" else klass.__dataclass_fields__[key].default
        assert ours == theirs, f"{fam.model_type}.{key}: ours {ours!r}, transformers {theirs!r}"


def test_every_llama_family_architecture_is_registered():
    registered = {a.model_type: a for a in architectures()}
    assert {"llama", "mistral", "mixtral", "qwen3"} <= set(registered)
    assert all(registered[k].exports for k in ("llama", "mistral", "mixtral", "qwen3"))


def _config(cls: str, **change) -> dict:
    config = getattr(transformers, cls)(**BASE, num_key_value_heads=2).to_dict()
    return {**config, **change}


@pytest.mark.parametrize("cls, change, message", [
    ("MistralConfig", dict(hidden_act="gelu_pytorch_tanh"), 'hidden_act = "gelu_pytorch_tanh" is not supported'),
    ("MixtralConfig", dict(router_jitter_noise=0.1), "router_jitter_noise = 0.1 is not supported"),
    ("MixtralConfig", dict(rope_scaling={"rope_type": "longrope", "long_factor": [1.0]}),
     "rope_type 'longrope' is not supported"),
    ("Qwen3Config", dict(attention_bias=True), "attention_bias = true is not supported"),
    ("Qwen3Config", dict(use_sliding_window=True, layer_types=["sliding_attention"]), "layer_types must list"),
    ("Qwen3Config", dict(rope_parameters={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16,
                                          "mrope_section": [2]}), "rope_parameters.mrope_section is not supported"),
    ("LlamaConfig", dict(quantization_config={"quant_method": "awq"}), "quantization_config = "),
    ("LlamaConfig", dict(is_encoder_decoder=True), "is_encoder_decoder = true is not supported"),
])
def test_settings_the_importers_do_not_implement_are_refused_naming_the_key(tmp_path, cls, change, message):
    (tmp_path / "config.json").write_text(json.dumps(_config(cls, **change)))
    with pytest.raises(HFFormatError, match=message.replace("(", r"\(").replace(")", r"\)")) as exc:
        hf_model_config(tmp_path)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("case, change, message", [
    ("llama", dict(norm={"kind": "dyt"}), "no Hugging Face architecture can express this model"),
    ("qwen3", dict(norm={"kind": "layernorm"}), "norm 'layernorm'"),
    ("mistral", dict(position={"kind": "rope", "fraction": 0.5}), "rope fraction 0.5"),
])
def test_export_refuses_what_an_architecture_cannot_express(saved, tmp_path, case, change, message):
    import attrs

    from toolkit.model import Transformer

    _, folder = saved(case)
    model = Transformer(attrs.evolve(hf_model_config(folder), **change))
    with pytest.raises(HFFormatError, match=message):
        save_hf(model, tmp_path, None if message.startswith("no ") else case)
