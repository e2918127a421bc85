"""Generation: the KV cache changes speed, never tokens; temperature, top-k and top-p do what they say."""
import math

import pytest
import torch

from toolkit.model import ModelConfig, Transformer, sample_next

BLOCK = 16


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=61, block_size=BLOCK, n_layer=2, n_head=4, n_embd=32))
    with torch.no_grad():  # sharper than init so sampling is not near-uniform
        for p in m.parameters():
            p.mul_(4.0)
    return m.eval()


def prompt(T=5, B=2, seed=0):
    return torch.randint(0, 61, (B, T), generator=torch.Generator().manual_seed(seed))


def greedy_by_hand(model, idx, n):
    """Greedy decoding the plain way: recompute the (cropped) context for every token."""
    for _ in range(n):
        with torch.no_grad():
            logits = model(idx[:, -BLOCK:])[0]  # (B, T, V)
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


@pytest.mark.parametrize("n_new", [6, 3 * BLOCK])  # within the block, and well beyond it
def test_cached_greedy_decoding_gives_the_tokens_of_full_recomputation(model, n_new):
    idx = prompt()
    cached = model.generate(idx, n_new, temperature=0)
    assert cached.shape == (2, 5 + n_new) and torch.equal(cached[:, :5], idx)
    assert torch.equal(cached, model.generate(idx, n_new, temperature=0, use_cache=False))
    assert torch.equal(cached, greedy_by_hand(model, idx, n_new))


@pytest.mark.parametrize("options", [dict(), dict(top_k=10), dict(top_p=0.9, temperature=0.8)])
def test_cached_sampling_with_a_seed_gives_the_tokens_of_full_recomputation(model, options):
    idx = prompt()
    cached = model.generate(idx, 2 * BLOCK, seed=7, **options)
    assert torch.equal(cached, model.generate(idx, 2 * BLOCK, seed=7, use_cache=False, **options))


def test_cached_logits_match_a_full_forward_pass(model):
    idx = prompt(T=BLOCK, B=1)
    with torch.no_grad():
        full = model(idx)[0]  # (1, T, V)
        cache = [{} for _ in model.transformer.h]
        steps = [model(idx[:, :4], cache=cache)[0]]  # prefill 4, then one token at a time
        steps += [model(idx[:, t:t + 1], cache=cache, start_pos=t)[0] for t in range(4, BLOCK)]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    assert cache[0]["k"].shape == (1, 4, BLOCK, 8)  # (B, nh, T, hs)


def test_a_prompt_longer_than_the_block_is_cropped(model):
    idx = prompt(T=BLOCK + 5)
    out = model.generate(idx, 4, temperature=0)
    assert torch.equal(out, greedy_by_hand(model, idx, 4))


def test_temperature_zero_top_k_one_and_tiny_top_p_are_all_greedy(model):
    idx = prompt()
    greedy = model.generate(idx, 20, temperature=0)
    assert torch.equal(model.generate(idx, 20, top_k=1, seed=1), greedy)
    assert torch.equal(model.generate(idx, 20, top_p=1e-6, seed=2), greedy)
    assert torch.equal(model.generate(idx, 20, temperature=1e-4, seed=3), greedy)


def test_a_seed_makes_sampling_reproducible_and_different_seeds_differ(model):
    idx = prompt()
    a = model.generate(idx, 30, seed=11, temperature=1.5)
    assert torch.equal(a, model.generate(idx, 30, seed=11, temperature=1.5))
    assert not torch.equal(a, model.generate(idx, 30, seed=12, temperature=1.5))
    assert not torch.equal(a, model.generate(idx, 30, temperature=0))


def test_generate_restores_training_mode_and_reports_each_token(model):
    model.train()
    seen = []
    try:
        out = model.generate(prompt(), 5, temperature=0, on_token=seen.append)
        assert model.training
    finally:
        model.eval()
    assert len(seen) == 5 and all(t.shape == (2, 1) for t in seen)
    assert torch.equal(torch.cat(seen, dim=1), out[:, 5:])


# -- the sampler on its own -----------------------------------------------------------------------
PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])


def draws(n=4000, **kwargs):
    logits = PROBS.log().expand(n, -1)  # n identical rows, one draw each
    return sample_next(logits, generator=torch.Generator().manual_seed(0), **kwargs).squeeze(1)


def test_top_k_samples_only_the_k_most_likely():
    assert set(draws(top_k=2).tolist()) == {0, 1}
    assert set(draws().tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("top_p, kept", [(0.0, {0}), (0.5, {0}), (0.6, {0, 1}), (0.85, {0, 1, 2}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, kept):
    assert set(draws(top_p=top_p).tolist()) == kept


def test_top_p_renormalises_within_the_nucleus():
    freq = torch.bincount(draws(n=20000, top_p=0.6), minlength=4).float() / 20000
    assert freq[0].item() == pytest.approx(0.5 / 0.8, abs=0.02) and freq[1].item() == pytest.approx(0.3 / 0.8, abs=0.02)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_scales_logits_before_sampling(temperature):
    want = torch.softmax(PROBS.log() / temperature, dim=0)
    freq = torch.bincount(draws(n=20000, temperature=temperature), minlength=4).float() / 20000
    assert torch.allclose(freq, want, atol=0.02)


def test_temperature_zero_is_argmax_per_row():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
    assert sample_next(logits, temperature=0).tolist() == [[1], [0]]


def test_negative_temperature_is_refused():
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        sample_next(torch.zeros(1, 4), temperature=-1.0)


def test_top_p_keeps_exactly_the_float64_nucleus_on_a_50k_vocabulary(monkeypatch):
    """The nucleus is the smallest set of most likely tokens whose probability reaches top_p: an fp32
    running sum over 50k tokens drifts enough to keep ~20 tokens too few at top_p 0.999."""
    torch.manual_seed(0)
    logits = torch.randn(1, 50257) * 3
    kept = []
    real = torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda probs, **kw: kept.append(int((probs > 0).sum())) or
                        real(probs, **kw))
    sample_next(logits, temperature=1.0, top_p=0.999)
    ranked = torch.softmax(logits.double(), -1)[0].sort(descending=True).values.tolist()
    lo, hi = 1, len(ranked)  # the smallest k whose exact (fsum) mass reaches top_p
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if math.fsum(ranked[:mid]) >= 0.999 else (mid + 1, hi)
    assert kept == [lo]
