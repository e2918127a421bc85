"""`playattention convert` both ways and `train --init-from`, on small random transformers models with a real tokenizer."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

from toolkit.cli import main  # noqa: E402
from toolkit.convert import model_differences  # noqa: E402
from toolkit.errors import ConfigError  # noqa: E402
from toolkit.generate import load_run  # noqa: E402
from toolkit.hf import hf_model_config  # noqa: E402
from toolkit.hf.tokenizers import hf_tokenizer  # noqa: E402
from toolkit.recipe import load_recipe  # noqa: E402
from toolkit.tokenizer import ASSETS, HFTokenizer  # noqa: E402
from toolkit.trainer import train  # noqa: E402

TEXT = (ASSETS / "tinyshakespeare.txt").read_text()[:20000]
SMALL = dict(hidden_size=48, num_attention_heads=6, num_hidden_layers=2, intermediate_size=40,
             max_position_embeddings=64, bos_token_id=0, eos_token_id=1)
ARCHS = {
    "llama3": ("LlamaConfig", dict(num_key_value_heads=3, head_dim=12, rope_parameters={
        "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
    "mistral": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=5)),
    "mixtral": ("MixtralConfig", dict(num_key_value_heads=2, num_local_experts=3, num_experts_per_tok=2)),
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=10, tie_word_embeddings=True)),
    "gemma2": ("Gemma2Config", dict(num_key_value_heads=3, head_dim=12, sliding_window=5, query_pre_attn_scalar=10)),
    "olmo2": ("Olmo2Config", dict(num_key_value_heads=2)),
    "pythia": ("GPTNeoXConfig", dict(rotary_pct=0.5, use_parallel_residual=True)),
}


def byte_level_bpe() -> "tokenizers.Tokenizer":
    """A Llama-like tokenizer trained offline on a little Shakespeare: byte-level BPE, <s> before every text."""
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                         show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return tok


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """arch -> (transformers model, folder with config, weights, tokenizer.json and tokenizer_config.json)."""
    tok = byte_level_bpe()
    made = {}

    def get(arch):
        if arch not in made:
            folder = tmp_path_factory.mktemp(f"hf-{arch}")
            cls, extra = ARCHS[arch]
            torch.manual_seed(0)
            config = getattr(transformers, cls)(**SMALL, **extra, vocab_size=tok.get_vocab_size())
            model = transformers.AutoModelForCausalLM.from_config(config).eval()
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 0.05)
            model.save_pretrained(folder)
            tok.save(str(folder / "tokenizer.json"))
            (folder / "tokenizer_config.json").write_text(json.dumps({
                "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                "clean_up_tokenization_spaces": False}))
            made[arch] = model, folder
        return made[arch]

    return get


def transformers_greedy_text(model, folder, prompt: str, n: int) -> str:
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    enc = tok(prompt, return_tensors="pt")
    model.generation_config.eos_token_id = None  # ours never stops early
    out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=1)
    return prompt + tok.decode(out[0, enc.input_ids.size(1):])


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_on_a_converted_folder_writes_transformers_greedy_text(hf_folder, tmp_path, capsys, arch):
    model, folder = hf_folder(arch)
    out = tmp_path / "run"
    assert main(["convert", str(folder), str(out)]) == 0
    assert {"recipe.toml", "model.safetensors", "model.toml", "tokenizer.json", "versions.json",
            "summary.json"} <= {p.name for p in out.iterdir()}
    capsys.readouterr()
    prompt = "ROMEO: But soft"
    assert main(["generate", str(out), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "16"]) == 0
    ours = capsys.readouterr().out.rstrip("\n")
    assert ours == transformers_greedy_text(model, folder, prompt, 16)


def test_the_folders_tokenizer_comes_along_with_its_bos_and_eos(hf_folder):
    _, folder = hf_folder("llama3")
    tok = hf_tokenizer(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    assert isinstance(tok, HFTokenizer) and (tok.bos, tok.eot) == (0, 1)
    assert [tok.bos, *tok.encode("Good morrow, cousin")] == theirs("Good morrow, cousin").input_ids


@pytest.mark.parametrize("arch", ["llama3", "mixtral", "qwen3", "gemma2", "olmo2", "pythia"])
def test_a_converted_run_exports_back_to_a_folder_transformers_loads(hf_folder, tmp_path, arch):
    model, folder = hf_folder(arch)
    assert main(["convert", str(folder), str(tmp_path / "run")]) == 0
    assert main(["convert", str(tmp_path / "run"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = tok("Now is the winter of our discontent", return_tensors="pt").input_ids
    assert ids[0, 0].item() == 0 and (back.config.bos_token_id, back.config.eos_token_id) == (0, 1)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)


def test_a_char_level_run_exports_with_a_character_tokenizer(tmp_path, tiny_recipe):
    """A run trained on characters: its vocabulary becomes a tokenizer.json transformers reads."""
    from toolkit.model import Transformer
    from toolkit.recipe import dump_recipe
    from toolkit.runfolder import RunFolder
    from toolkit.tokenizer import CharTokenizer

    chars = "".join(sorted(set(TEXT)))
    recipe = load_recipe(tiny_recipe(tmp_path), [f"model.vocab_size={len(chars)}", *[
        "model.attention.kind=gqa", "model.attention.n_kv_head=2", "model.norm.kind=rmsnorm",
        "model.position.kind=rope", "model.mlp.kind=swiglu", "model.bias=false"]])
    run = tmp_path / "run"
    run.mkdir()
    torch.manual_seed(0)
    model = Transformer(recipe.model)
    (run / "recipe.toml").write_text(dump_recipe(recipe))
    RunFolder(run, "tiny").write_export(model.state_dict(), recipe, 0)
    CharTokenizer.from_chars(chars).save(run)
    assert main(["convert", str(run), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "llama"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "First Citizen:\nBefore we proceed"
    ids = tok(text, return_tensors="pt").input_ids
    assert ids[0].tolist() == CharTokenizer.from_chars(chars).encode(text) and tok.decode(ids[0]) == text
    with torch.no_grad():
        assert torch.allclose(back(ids).logits, model(ids)[0], atol=1e-5, rtol=1e-5)


def test_convert_refuses_what_it_cannot_do_in_one_line(hf_folder, tmp_path, capsys):
    _, folder = hf_folder("mistral")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(["convert", str(folder), str(tmp_path / "full")]) == 2
    assert main(["convert", str(folder), str(tmp_path / "o"), "--to", "hf"]) == 2
    assert main(["convert", str(tmp_path / "nothing"), str(tmp_path / "o")]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"error: {tmp_path / 'full'}: exists and is not an empty folder; give a new or empty OUT_DIR",
                     f"error: {folder}: a Hugging Face folder already; --to hf converts a run folder (leave it out "
                     f"to make a run folder of this one)",
                     f"error: {tmp_path / 'nothing'}: not a Hugging Face folder (expected config.json and weights; "
                     f"a run folder converts the other way: --to hf)"]


def test_init_from_names_every_difference_between_recipe_and_source(hf_folder):
    _, folder = hf_folder("qwen3")
    source = hf_model_config(folder)
    import attrs

    changed = attrs.evolve(source, n_layer=3, norm={"kind": "rmsnorm", "eps": 1e-5}, dropout=0.1, block_size=16)
    lines = model_differences(source, changed)
    assert lines == ["model.n_layer: 2 -> 3", "model.norm.eps: 1e-06 -> 1e-05"]  # dropout, block_size: free


def _first_step_loss(run_dir) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r["loss"] for r in rows if r["type"] == "train" and r["step"] == 1)


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [1, 3])
def test_training_from_a_converted_folder_starts_at_the_imported_models_loss(hf_folder, tmp_path, zero_stage):
    from toolkit import data

    model, folder = hf_folder("mixtral")
    (tmp_path / "text.txt").write_text(TEXT)
    assert main(["convert", str(folder), str(tmp_path / "run")]) == 0
    recipe = load_recipe(tmp_path / "run", [
        "model.block_size=32", "train.micro_batch=4", "train.max_steps=2", "train.warmup_steps=0",
        "train.eval_interval=2", "train.eval_batches=1", f"data.paths=[\"{tmp_path / 'text.txt'}\"]",
        f"data.prepared_dir=\"{tmp_path / 'data'}\"", f"train.out_dir=\"{tmp_path / 'runs'}\"",
        f"deepspeed.zero_stage={zero_stage}", "generate.max_new_tokens=4"])
    summary = train(recipe, run_dir=tmp_path / "ft", progress=False, init_from=tmp_path / "run")
    assert summary["status"] == "finished", summary["error"]
    # the first batch the trainer drew, through transformers' model with the imported weights
    loader = data.TokenLoader(tmp_path / "data", "train", 4, 32, seed=recipe.train.seed, rank=0, world_size=1)
    x, y = loader.next_batch()
    with torch.no_grad():
        logits = model(x).logits
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)).item()
    assert abs(_first_step_loss(tmp_path / "ft") - want) / want < 1e-5
    assert summary["init_from"] == str((tmp_path / "run").resolve())
    tuned, _, _ = load_run(tmp_path / "ft")  # a finished run like any other: generate and --init-from take it
    assert tuned.config.mlp.kind == "moe" and tuned.config.block_size == 32


def test_init_from_a_recipe_for_another_model_is_refused_before_anything_runs(hf_folder, tmp_path, capsys):
    _, folder = hf_folder("llama3")
    assert main(["convert", str(folder), str(tmp_path / "run")]) == 0
    code = main(["train", str(tmp_path / "run"), "--init-from", str(folder), "--set", "model.n_layer=3",
                 "--set", "model.mlp.hidden_dim=64", "--run-dir", str(tmp_path / "ft")])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and not (tmp_path / "ft").exists()
    assert err == [f"error: --init-from {folder}: the recipe's model differs from the one there (model.n_layer: 2 -> 3)",
                   f"error: --init-from {folder}: the recipe's model differs from the one there "
                   f"(model.mlp.hidden_dim: 40 -> 64)"]


def _ablation_file(tmp_path, run, body: str):
    (tmp_path / "text.txt").write_text(TEXT)
    path = tmp_path / "ft.toml"
    path.write_text(f'''recipe = "{run / 'recipe.toml'}"
init_from = "{run}"
steps = 2
seeds = [1]
set = ["model.block_size=32", "train.micro_batch=2", "train.warmup_steps=0", "train.eval_batches=1",
       "generate.max_new_tokens=4", 'data.paths=["{tmp_path / 'text.txt'}"]', 'data.prepared_dir="{tmp_path / 'data'}"']
{body}''')
    return path


def test_an_ablation_from_a_converted_folder_may_vary_training_but_not_the_model(hf_folder, tmp_path):
    from toolkit.ablation import load_ablation

    _, folder = hf_folder("qwen3")
    assert main(["convert", str(folder), str(tmp_path / "run")]) == 0
    good = _ablation_file(tmp_path, tmp_path / "run", '[grid]\n"train.lr" = [1e-4, 3e-4]\n')
    ablation, resolved = load_ablation(good)
    assert ablation.init_from == tmp_path / "run" and [r.variant.name for r in resolved] == ["lr=0.0001", "lr=0.0003"]
    bad = _ablation_file(tmp_path, tmp_path / "run", '[grid]\n"model.n_layer" = [2, 3]\n')
    with pytest.raises(ConfigError) as exc:
        load_ablation(bad)
    assert exc.value.lines == [f"{bad}: variant 'n_layer=3': --init-from {tmp_path / 'run'}: the recipe's model "
                               f"differs from the one there (model.n_layer: 2 -> 3)"]


@pytest.mark.slow
def test_ablation_runs_start_from_the_converted_weights(hf_folder, tmp_path):
    _, folder = hf_folder("mistral")
    assert main(["convert", str(folder), str(tmp_path / "run")]) == 0
    file = _ablation_file(tmp_path, tmp_path / "run", '[[variant]]\nname = "slow"\nset = ["train.lr=1e-5"]\n')
    assert main(["ablate", str(file), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    summary = json.loads((tmp_path / "out" / "slow-s1" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["init_from"] == str((tmp_path / "run").resolve())


def test_a_gpt2_folder_converts_with_tiktokens_gpt2_and_exports_its_bpe_files(tmp_path, capsys):
    import shutil

    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64)).eval()
    hf.save_pretrained(tmp_path / "hf")
    shutil.copyfile(ASSETS / "gpt2" / "encoder.json", tmp_path / "hf" / "vocab.json")
    shutil.copyfile(ASSETS / "gpt2" / "vocab.bpe", tmp_path / "hf" / "merges.txt")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "run")]) == 0
    assert load_recipe(tmp_path / "run").data.tokenizer.kind == "gpt2"
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "run"), "--prompt", "Hello, I'm", "--temperature", "0",
                 "--max-new-tokens", "8"]) == 0
    ours = capsys.readouterr().out.rstrip("\n")
    tok = transformers.GPT2TokenizerFast(str(tmp_path / "hf" / "vocab.json"), str(tmp_path / "hf" / "merges.txt"))
    ids = tok("Hello, I'm", return_tensors="pt").input_ids
    hf.generation_config.eos_token_id = None
    want = hf.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert ours == "Hello, I'm" + tok.decode(want[0, ids.size(1):])
    assert main(["convert", str(tmp_path / "run"), str(tmp_path / "back"), "--to", "hf"]) == 0
    back = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    assert back("Hello, I'm").input_ids == ids[0].tolist()
