"""The architecture recipes at their real sizes have the published parameter counts (as `playattention
inspect` reports them), the same as transformers' own models of those configs, and the CPU versions build."""
from pathlib import Path

import pytest
import torch

from toolkit.cli import main
from toolkit.probe import build_meta_model
from toolkit.model import Transformer
from toolkit.recipe import load_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"

# recipe: (total parameters, parameters outside the embeddings and output head), and the source
PUBLISHED = {
    # Gemma 2 report, Table 2: 2,024,517,888 non-embedding; google/gemma-2-2b: 256,000 x 2,304 embeddings, tied
    "gemma2-2b": (2_614_341_888, 2_024_517_888),
    # allenai/OLMo-2-0425-1B and OLMo-2-1124-7B (1.48B and 7.30B on their model cards; exact: transformers, below)
    "olmo2-1b": (1_484_916_736, 1_073_874_944),
    "olmo2-7b": (7_298_617_344, 6_476_533_760),
    # Pythia paper (Biderman et al. 2023), Table 1: total and non-embedding parameters
    "pythia-160m": (162_322_944, 85_056_000),
    "pythia-1.4b": (1_414_647_808, 1_208_602_624),
}


def counts(name: str) -> tuple[int, int]:
    """(total, non-embedding) parameters from the rows `playattention inspect` prints."""
    recipe = load_recipe(RECIPES / f"{name}.toml")
    rows = build_meta_model(recipe).component_report(recipe.model.block_size)
    embedding = sum(r["params"] for r in rows if r["component"] in ("embedding", "lm_head"))
    return rows[-1]["params"], rows[-1]["params"] - embedding


@pytest.mark.parametrize("name", PUBLISHED)
def test_real_size_recipe_has_the_published_parameter_count(name):
    assert counts(name) == PUBLISHED[name]


HF_CONFIGS = {  # the published config.json values that decide the shapes
    "gemma2-2b": ("Gemma2", dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                                 num_attention_heads=8, num_key_value_heads=4, head_dim=256)),
    "olmo2-1b": ("Olmo2", dict(vocab_size=100352, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                               num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False)),
    "olmo2-7b": ("Olmo2", dict(vocab_size=100352, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                               num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False)),
    "pythia-160m": ("GPTNeoX", dict(vocab_size=50304, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                    num_attention_heads=12, tie_word_embeddings=False)),
    "pythia-1.4b": ("GPTNeoX", dict(vocab_size=50304, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                                    num_attention_heads=16, tie_word_embeddings=False)),
}


@pytest.mark.parametrize("name", HF_CONFIGS)
def test_real_size_recipe_counts_what_transformers_counts(name):
    transformers = pytest.importorskip("transformers")
    arch, fields = HF_CONFIGS[name]
    config = getattr(transformers, f"{arch}Config")(**fields)
    with torch.device("meta"):
        hf = getattr(transformers, f"{arch}ForCausalLM")(config)
    assert counts(name)[0] == sum(p.numel() for p in hf.parameters())


def test_inspect_prints_pythia_160ms_published_count(capsys):
    assert main(["inspect", str(RECIPES / "pythia-160m.toml")]) == 0
    total = next(line for line in capsys.readouterr().out.splitlines() if line.split()[:1] == ["total"])
    assert total.split()[1] == "162,322,944"


@pytest.mark.parametrize("small, real", [("gemma2-cpu", "gemma2-2b"), ("olmo2-cpu", "olmo2-1b"),
                                         ("pythia-cpu", "pythia-160m")])
def test_cpu_recipe_has_the_real_sizes_parts_and_learns(small, real):
    recipe, full = load_recipe(RECIPES / f"{small}.toml"), load_recipe(RECIPES / f"{real}.toml")
    for family in ("attention", "norm", "position", "mlp", "block"):
        assert getattr(recipe.model, family).kind == getattr(full.model, family).kind, family
    assert {n: (g.at, g.attention.kind) for n, g in recipe.model.layers.items()} == \
        {n: (g.at, g.attention.kind) for n, g in full.model.layers.items()}
    torch.manual_seed(0)
    model = Transformer(recipe.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    idx = torch.randint(0, recipe.model.vocab_size, (4, recipe.model.block_size), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(5):  # the same batch: the loss must fall
        _, loss = model(idx[:, :-1], idx[:, 1:])
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0]
