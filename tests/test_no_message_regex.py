"""Errors are data until they are printed: no regex in toolkit/ takes our own error messages apart.

Every ``re.<function>(pattern, ...)`` call in toolkit/ is listed here by its pattern with why it is not
over one of our messages. A new regex fails this test until it is listed: if it reads a path, a value
or an origin back out of an error line, carry that as data instead (:class:`toolkit.errors.Problem`).
"""
from __future__ import annotations

import ast
from pathlib import Path

TOOLKIT = Path(__file__).resolve().parent.parent / "toolkit"

ALLOWED = {
    # user input and names
    r"^[A-Za-z0-9][A-Za-z0-9._+=,-]*$": "ablation: a variant name the user wrote",
    r"[^A-Za-z0-9._+=,-]+": "ablation: a variant name made from override values",
    r"[A-Za-z0-9_-]+": "errors.path_key: whether a recipe key can be written bare in a path",
    r"[\x00-\x1f\x7f]": "errors.one_line: escaping control characters of any text to print",
    r"[^\w.-]+": "runfolder: a run folder name made from the recipe name",
    r"-(\d{8}-\d{6})(?:-(\d+))?$": "runfolder: a run folder's timestamp suffix",
    r"^step-(\d+)$": "checkpoint: a checkpoint tag",
    r"step-0*(\d+)": "checkpoint: a --resume step the user wrote",
    r"^(?P<label>[^/]+)/L(?P<layer>\d+)/(?P<stat>[^/]+)$": "report: a per-layer metric name",
    rb"^=== step (\d+) \|": "runfolder: the step headers of samples.txt, a file we write",
    "re.escape(pattern).replace('\\\\*', '[^.]+') + '$'": "testing/conformance: a parameter-name pattern with *",
    r"(?<=[.!?])\s+(?=[A-Z])": "commands/plugins: the first sentence of a plugin's docstring",
    # package metadata and file names
    r"^Name:[ \t]*(\S.*?)\s*$": "plugin_manager: a package's METADATA",
    r"^\s*[^=\s\[][^=]*=\s*[\w.]+\s*(:\s*[\w.]+\s*)?(\[.*\])?\s*$": "plugin_manager: an entry_points.txt line",
    r"(?:train|val)_\d{6}\.bin|tokenizer\.json|meta\.json|progress\.json": "data/shards: the files a shard folder owns",
    r"\S\n(?=\S)": "data/tokenize: where a long text may be cut",
    # state dict keys of Hugging Face checkpoints
    r"^model\.layers\.(\d+)\.(.+)$": "hf/llama: a layer's weight name",
    r"^block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$": "hf/llama: an expert's weight name",
    r"^transformer\.h\.(\d+)\.mlp\.experts\.(\d+)\.(c_fc|c_proj)\.weight$": "hf/llama: our expert's weight name",
    r"rotary_emb\.inv_freq$": "hf/llama: a buffer older checkpoints saved",
    r"\.(c_attn|c_proj|c_fc)\.weight$": "hf/gpt2: Conv1D weight names",
    r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$": "hf/gpt2: causal-mask buffers of old checkpoints",
    # other programs' text, which holds what we need nowhere else
    r"\(at line (\d+), column (\d+)\)": "recipe/compose: tomllib gives line and column only in its message before 3.14",
    r"\s*\(at line \d+, column \d+\)": "recipe/compose: the same, removed from tomllib's reason",
    r"Unsupported global: GLOBAL ([\w.]+)": "checkpoint: torch's weights-only refusal names the global only in text",
    r"^(error:|([A-Za-z_][\w.]*)?(Error|Exception|Interrupt|Exit)\b)":
        "ablate: the line of a child run's log that says why it died (another process: only its text exists)",
}


def regex_calls(root: Path = TOOLKIT) -> list[tuple[str, int, str]]:
    """(file, line, pattern) of every ``re.<function>(...)`` call under ``root`` (pattern: its first argument's source)."""
    out = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "re"
                    and node.func.attr != "escape" and node.args):
                first = node.args[0]
                pattern = first.value if isinstance(first, ast.Constant) else ast.unparse(first)
                out.append((str(path.relative_to(root.parent)), node.lineno, pattern))
    return out


def test_no_regex_in_toolkit_takes_an_error_message_apart():
    unlisted = [f"{f}:{n}: {p!r}" for f, n, p in regex_calls() if p not in ALLOWED]
    assert not unlisted, ("regexes not in tests/test_no_message_regex.py's ALLOWED; if one reads an error "
                          "message, carry the parts as data instead:\n" + "\n".join(unlisted))


def test_every_allowed_regex_is_still_there():
    found = {p for _, _, p in regex_calls()}
    assert not set(ALLOWED) - found, "remove these from ALLOWED: " + ", ".join(map(repr, set(ALLOWED) - found))


def test_the_scan_finds_a_regex_over_a_message(tmp_path):
    (tmp_path / "toolkit").mkdir()
    (tmp_path / "toolkit" / "x.py").write_text('import re\nPATH = re.compile(r"\\$(\\S+): ")\nm = re.search(PATH, str(exc))\n')
    assert regex_calls(tmp_path / "toolkit") == [("toolkit/x.py", 2, r"\$(\S+): "), ("toolkit/x.py", 3, "PATH")]
