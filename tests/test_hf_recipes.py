"""The shipped recipes of real models have the published sizes, and are the models transformers builds from
the configs our exporter writes for them (counted on the meta device: no memory, no download)."""
from pathlib import Path

import pytest
import torch

from toolkit.cli import main
from toolkit.hf import export_architecture
from toolkit.probe import build_meta_model
from toolkit.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
#: as the model cards and transformers count them
PUBLISHED = {
    "mistral-7b": ("mistral", 7_241_732_096),
    "mixtral-8x7b": ("mixtral", 46_702_792_704),
    "qwen3-8b": ("qwen3", 8_190_735_360),
    "qwen3-0.6b": ("qwen3", 596_049_920),
    "llama3-8b": ("llama", 8_030_261_248),
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_real_size_recipes_have_the_published_parameter_counts(name):
    transformers = pytest.importorskip("transformers")
    model_type, published = PUBLISHED[name]
    model = build_meta_model(load_recipe(ROOT / "recipes" / f"{name}.toml"))
    assert model.num_params(non_embedding=False) == published
    arch, config = export_architecture(model)
    assert arch.model_type == model_type
    with torch.device("meta"):
        theirs = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config))
    assert sum(p.numel() for p in theirs.parameters()) == published


def test_inspect_reports_the_published_count(capsys):
    assert main(["inspect", str(ROOT / "recipes" / "qwen3-0.6b.toml")]) == 0
    total = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("total"))
    assert "596,049,920" in total
