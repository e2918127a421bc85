"""GPT-2 weights in and out of Hugging Face layout, checked against transformers' own GPT2LMHeadModel."""
import json
import re

import attrs
import pytest
import torch

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

from toolkit.hf import HFFormatError, adapter, save_hf  # noqa: E402
from toolkit.converter import resolve_spec  # noqa: E402
from toolkit.families import Spec  # noqa: E402
from toolkit.model import ModelConfig, Transformer  # noqa: E402
from toolkit.plugin_manager import PluginManager, get_registry  # noqa: E402
from toolkit.registry import Source  # noqa: E402

GPT2 = adapter("gpt2")
SMALL = dict(n_layer=2, n_head=4, n_embd=64, vocab_size=100, n_positions=32)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def random_hf_gpt2(**overrides) -> "transformers.GPT2LMHeadModel":
    """A small GPT2LMHeadModel with every parameter random (biases and norms too, so no mapping hides)."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(**{**SMALL, "bos_token_id": None, "eos_token_id": None, **overrides})
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def hf_logits(model, idx):
    with torch.no_grad():
        return model(idx).logits


def our_logits(model, idx):
    with torch.no_grad():
        return model(idx)[0]


IDX = torch.randint(0, 100, (2, 32), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("activation", ["gelu_new", "gelu", "gelu_pytorch_tanh"])
def test_imported_gpt2_matches_transformers_logits(tmp_path, activation):
    hf = random_hf_gpt2(activation_function=activation)
    hf.save_pretrained(tmp_path)
    ours = GPT2.load(tmp_path)
    assert ours.config.mlp.options.approximate == ("none" if activation == "gelu" else "tanh")
    assert rel_err(our_logits(ours, IDX), hf_logits(hf, IDX)) < 1e-5


@pytest.mark.parametrize("activation", ["gelu_new", "gelu"])
def test_exported_gpt2_loads_in_transformers_with_same_logits(tmp_path, activation):
    hf = random_hf_gpt2(activation_function=activation)
    hf.save_pretrained(tmp_path / "in")
    ours = GPT2.load(tmp_path / "in")
    save_hf(ours, tmp_path / "out", "gpt2")
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    assert back.config.activation_function == activation
    assert rel_err(hf_logits(back, IDX), our_logits(ours, IDX)) < 1e-5


def test_gpt2_round_trip_keeps_config_and_weights_exactly(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=100, block_size=32, n_layer=2, n_head=4, n_embd=64,
                      norm={"kind": "layernorm", "eps": 1e-6}, mlp={"kind": "gelu", "hidden_dim": 96})
    ours = Transformer(cfg)
    save_hf(ours, tmp_path, "gpt2")
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["n_inner"] == 96 and written["layer_norm_epsilon"] == 1e-6
    again = GPT2.load(tmp_path)
    reg = get_registry()
    for field in attrs.fields(ModelConfig):
        a, b = getattr(again.config, field.name), getattr(cfg, field.name)
        if isinstance(a, Spec):  # the same component with the same resolved options
            assert resolve_spec(reg, a) == resolve_spec(reg, b), field.name
        else:
            assert a == b, field.name
    for (name, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_untied_and_bias_free_models_export_to_equivalent_gpt2(tmp_path):
    torch.manual_seed(0)
    ours = Transformer(ModelConfig(vocab_size=100, block_size=32, n_layer=2, n_head=4, n_embd=64,
                                   bias=False, tie_embeddings=False)).eval()
    save_hf(ours, tmp_path, "gpt2")
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert back.lm_head.weight.data_ptr() != back.transformer.wte.weight.data_ptr()
    assert torch.equal(back.lm_head.weight, ours.lm_head.weight)
    assert rel_err(hf_logits(back, IDX), our_logits(ours, IDX)) < 1e-5


def test_imported_gpt2_ties_head_to_embedding(tmp_path):
    random_hf_gpt2().save_pretrained(tmp_path)
    ours = GPT2.load(tmp_path)
    assert ours.lm_head.weight is ours.transformer.wte.weight


def test_loads_pytorch_model_bin_and_unprefixed_openai_names_with_mask_buffers(tmp_path):
    # The original gpt2 checkpoints: pytorch_model.bin, no "transformer." prefix, attn.bias/masked_bias buffers.
    hf = random_hf_gpt2()
    hf.config.to_json_file(tmp_path / "config.json")
    sd = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    for i in range(SMALL["n_layer"]):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(32, 32)).view(1, 1, 32, 32)
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    ours = GPT2.load(tmp_path)
    assert rel_err(our_logits(ours, IDX), hf_logits(hf, IDX)) < 1e-5


def test_config_mapping_follows_hf_names():
    cfg = GPT2.config_from_hf({"model_type": "gpt2", "n_embd": 48, "n_head": 3, "n_layer": 5, "n_positions": 64,
                               "vocab_size": 77, "layer_norm_epsilon": 1e-6, "activation_function": "relu",
                               "tie_word_embeddings": False, "resid_pdrop": 0.1})
    assert (cfg.n_embd, cfg.n_head, cfg.n_layer, cfg.block_size, cfg.vocab_size) == (48, 3, 5, 64, 77)
    assert cfg.norm.options == {"eps": 1e-6} and cfg.mlp.kind == "relu" and not cfg.tie_embeddings
    assert cfg.dropout == 0.0  # not inherited from resid_pdrop, as in nanoGPT's from_pretrained


def test_gpt2_config_keys_the_importer_does_not_read_are_refused_naming_the_key_and_the_file(tmp_path):
    random_hf_gpt2().save_pretrained(tmp_path)  # every key transformers writes is read (or harmless)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "attn_logit_softcapping": 30.0}))
    with pytest.raises(HFFormatError, match=re.escape(f"{tmp_path}/config.json: attn_logit_softcapping = 30.0 is not "
                                                      f"supported by this importer")):
        GPT2.load(tmp_path)


def test_missing_folder_or_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        GPT2.load(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        GPT2.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", **SMALL}))
    with pytest.raises(FileNotFoundError, match="no weights found.*model.safetensors"):
        GPT2.load(tmp_path)


def test_other_architectures_are_refused_by_the_gpt2_loader(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(HFFormatError, match="model_type 'llama' is not 'gpt2'.*LlamaForCausalLM"):
        GPT2.load(tmp_path)
    with pytest.raises(HFFormatError, match="activation_function 'silu'"):
        GPT2.config_from_hf({"model_type": "gpt2", **SMALL, "activation_function": "silu"})


def test_weights_that_do_not_fit_are_listed(tmp_path):
    random_hf_gpt2().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "n_layer": 3}))
    with pytest.raises(HFFormatError, match=r"missing transformer\.h\.2\."):
        GPT2.load(tmp_path)


@pytest.mark.parametrize("change, reason", [
    (dict(position="rope_stand_in"), "position 'rope_stand_in' (GPT-2 has 'learned')"),
    (dict(layout="post"), "block 'post_norm' (GPT-2 has 'pre_norm')"),
    (dict(attention={"kind": "mha", "qk_norm": "layernorm"}), "attention qk_norm (GPT-2 has none)"),
])
def test_models_gpt2_cannot_express_are_refused_with_the_reason(tmp_path, change, reason):
    # a registry with one extra position kind, so this does not depend on which other plugins exist
    pm = PluginManager(entry_points=False)
    learned = pm.registry.get("position", "learned")
    pm.registry.register("position", "rope_stand_in", learned.factory, learned.options, source=Source("test"))
    cfg = ModelConfig(vocab_size=100, block_size=32, n_layer=1, n_head=4, n_embd=64, **change)
    with pytest.raises(HFFormatError, match=re.escape(f"cannot export as GPT-2: unsupported {reason}")):
        save_hf(Transformer(cfg, pm.registry), tmp_path, "gpt2")
    assert not (tmp_path / "model.safetensors").exists()


def test_half_precision_files_load_into_fp32_unless_a_dtype_is_asked_for(tmp_path):
    hf = random_hf_gpt2()
    hf.half().save_pretrained(tmp_path)
    ours = GPT2.load(tmp_path)
    assert ours.transformer.wte.weight.dtype == torch.float32
    assert torch.equal(ours.transformer.h[0].attn.c_attn.weight, hf.transformer.h[0].attn.c_attn.weight.float().t())
    assert GPT2.load(tmp_path, dtype=torch.bfloat16).lm_head.weight.dtype == torch.bfloat16
