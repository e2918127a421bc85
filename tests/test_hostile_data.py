"""`prepare --input` of hostile inputs, and onto a full disk: one line each, no traceback, no
partial files left (issue 19, item 8)."""
import errno

import pytest

from toolkit import cli, safeio


def prepare(capsys, tmp_path, name) -> tuple[int, list[str]]:
    code = cli.main(["prepare", "--input", str(tmp_path / name), "--tokenizer", "char", "--out",
                     str(tmp_path / "out"), "--quiet"])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, err.splitlines()


@pytest.mark.parametrize("name, text, said", [
    ("deep.jsonl", '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n", "nested too deep"),
    ("huge.jsonl", '{"text": "ok", "n": 1' + "0" * 100_000 + "}\n", "a number of more than 4300 digits"),
    ("surrogate.jsonl", '{"text": "a\\ud800b"}\n', "holds a lone surrogate '\\ud800' at character 1"),
    ("empty.txt", "", "no text in it (1 documents, 0 tokens)"),
], ids=["deep", "huge-number", "lone-surrogate", "empty"])
def test_hostile_input_files_are_one_line(tmp_path, capsys, name, text, said):
    (tmp_path / name).write_text(text)
    code, err = prepare(capsys, tmp_path, name)
    assert code == 2 and len(err) == 1 and said in err[0] and err[0].startswith(f"error: {tmp_path / name}"), err


def test_a_parquet_file_of_no_rows_is_one_line(tmp_path, capsys):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    code, err = prepare(capsys, tmp_path, "empty.parquet")
    assert code == 2 and err == [f"error: {tmp_path / 'empty.parquet'}: no text in it (0 documents, 0 tokens); "
                                 f"nothing to prepare"]


def test_a_full_disk_is_one_line_and_leaves_no_partial_shard(tmp_path, capsys, monkeypatch):
    (tmp_path / "in.txt").write_text("hello world\n" * 50)
    real = safeio.fsync

    def full_disk(path):  # a full disk shows at the latest when the shard's temporary file is flushed
        if str(path).endswith(".bin.tmp"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path)

    monkeypatch.setattr(safeio, "fsync", full_disk)
    code, err = prepare(capsys, tmp_path, "in.txt")
    assert code == 2 and len(err) == 1 and "cannot write it (No space left on device)" in err[0], err
    assert not list((tmp_path / "out").glob("*.tmp"))
