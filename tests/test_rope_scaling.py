"""RoPE context extension (linear, dynamic NTK, YaRN, llama3): the rope plugin's frequencies against transformers'."""
import pytest
import torch

from toolkit.errors import ConfigError
from toolkit.model import ModelConfig, Transformer
from toolkit.plugins.impl.position import rope_inv_freq
from toolkit.plugins.position import RopeOptions

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

HEAD_DIM = 24


def hf_inv_freq(rope_parameters: dict, max_len: int, seq_len=None):
    config = transformers.LlamaConfig(hidden_size=4 * HEAD_DIM, num_attention_heads=4, max_position_embeddings=max_len,
                                      rope_parameters=rope_parameters)
    inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_parameters["rope_type"]](config, "cpu", seq_len=seq_len)
    return inv_freq, scale


@pytest.mark.parametrize("ours, theirs", [
    (dict(scaling="linear", factor=3.0), {"rope_type": "linear", "factor": 3.0}),
    (dict(scaling="llama3", factor=8.0, original_max_len=64, low_freq_factor=1.0, high_freq_factor=4.0),
     {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64, "low_freq_factor": 1.0,
      "high_freq_factor": 4.0}),
    (dict(scaling="yarn", factor=4.0, original_max_len=64), {"rope_type": "yarn", "factor": 4.0,
                                                           "original_max_position_embeddings": 64}),
    (dict(scaling="yarn", factor=16.0, original_max_len=32, beta_fast=8.0, beta_slow=2.0, truncate=False,
          attention_factor=1.3),
     {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 32, "beta_fast": 8.0, "beta_slow": 2.0,
      "truncate": False, "attention_factor": 1.3}),
], ids=["linear", "llama3", "yarn", "yarn-options"])
def test_scaled_frequencies_equal_transformers(ours, theirs):
    opts = RopeOptions(theta=20000.0, **ours)
    want, scale = hf_inv_freq({**theirs, "rope_theta": 20000.0}, max_len=256)
    torch.testing.assert_close(rope_inv_freq(opts, HEAD_DIM), want, rtol=1e-6, atol=0)
    rope = Transformer(ModelConfig(vocab_size=8, block_size=256, n_layer=1, n_head=4, n_embd=4 * HEAD_DIM,
                                   position={"kind": "rope", "theta": 20000.0, **ours})).transformer.wpe
    assert rope.mscale == pytest.approx(scale)


@pytest.mark.parametrize("seq_len", [10, 64, 65, 200])
def test_dynamic_ntk_grows_the_base_only_past_the_original_context(seq_len):
    opts = RopeOptions(scaling="dynamic", factor=2.0, original_max_len=64)
    want, _ = hf_inv_freq({"rope_type": "dynamic", "factor": 2.0}, max_len=64, seq_len=torch.tensor(seq_len))
    got = rope_inv_freq(opts, HEAD_DIM, seq_len=torch.tensor(seq_len))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    plain = rope_inv_freq(RopeOptions(), HEAD_DIM)
    assert torch.equal(got, plain) == (seq_len <= 64)


@pytest.mark.parametrize("position, message", [
    ({"kind": "rope", "scaling": "yarn", "factor": 4.0}, "scaling 'yarn' needs original_max_len"),
    ({"kind": "rope", "scaling": "llama3", "original_max_len": 8, "low_freq_factor": 4.0, "high_freq_factor": 1.0},
     "high_freq_factor (1.0) must exceed low_freq_factor (4.0)"),
])
def test_scalings_missing_what_they_need_are_refused(position, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Transformer(ModelConfig(vocab_size=8, block_size=16, n_layer=1, n_head=2, n_embd=16, position=position))
