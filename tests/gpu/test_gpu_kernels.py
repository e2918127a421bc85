"""On CUDA: the fast paths are the ones actually taken, and cached decoding stays exact."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from toolkit import ModelConfig, Transformer

pytestmark = pytest.mark.gpu


def small(attention) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, block_size=128, n_layer=2, n_head=8, n_embd=512, attention=attention)
    return Transformer(cfg).cuda()


@pytest.mark.parametrize("attention", [{"kind": "mha"}, {"kind": "gqa", "n_kv_head": 2}])
def test_flash_kernel_is_used_for_training_forward_and_backward(attention):
    model = small(attention)
    idx = torch.randint(0, 256, (4, 128), device="cuda")
    # Restricting SDPA to the flash kernel makes any fallback to another kernel an error.
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss = model(idx, idx)
        loss.backward()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("attention", [{"kind": "mha"}, {"kind": "gqa", "n_kv_head": 2}])
def test_cached_generation_on_gpu_matches_recomputation(attention):
    model = small(attention).eval()
    prompt = torch.randint(0, 256, (2, 5), device="cuda")
    cached = model.generate(prompt, 40, temperature=0, use_cache=True)
    full = model.generate(prompt, 40, temperature=0, use_cache=False)
    assert torch.equal(cached, full)
