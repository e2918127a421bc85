"""prepare from parquet files and folders saved by Hugging Face datasets: the same tokens as JSONL."""
import json
import sys

import attrs
import pytest

from test_data import documents, shard_bytes, split_tokens, write_jsonl
from toolkit.cli import main
from toolkit.data import prepare, read_meta, tokenize
from toolkit.data.shards import _ShardWriter
from toolkit.data.sources import _rows, _table_batches
from toolkit.errors import DataError
from toolkit.recipe import DataConfig

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def write_parquet(path, texts, row_group_size=7, column="text"):
    """A parquet file with an id column beside the text, cut into row groups of ``row_group_size`` rows."""
    table = pa.table({"id": list(range(len(texts))), column: texts})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_saved_dataset(path, texts, num_shards=3):
    """A folder as ``datasets.Dataset.save_to_disk`` writes it: state.json and Arrow stream files."""
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    dataset = datasets.Dataset.from_dict({"text": texts, "id": list(range(len(texts)))})
    dataset.save_to_disk(str(path), num_shards=num_shards)
    return path


def prepared(tmp_path, name, paths, **kw):
    """Prepare ``paths`` into tmp_path/name with small shards; the prepared folder."""
    data = DataConfig(dataset=name, tokenizer=kw.pop("tokenizer", "gpt2"), paths=[str(p) for p in paths],
                      prepared_dir=str(tmp_path / name), **kw)
    return prepare(data, progress=False, workers=1, shard_size=700)


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------- same tokens as JSONL


@pytest.mark.parametrize("tokenizer", ["gpt2", "char"])
def test_parquet_files_yield_exactly_the_tokens_of_the_same_texts_as_jsonl(tmp_path, tokenizer):
    texts = documents(130, seed=3) + ["", "last one\nwith a newline"]
    write_jsonl(tmp_path / "all.jsonl", texts)
    (tmp_path / "pq").mkdir()
    write_parquet(tmp_path / "pq" / "a.parquet", texts[:60], row_group_size=7)
    write_parquet(tmp_path / "pq" / "b.parquet", texts[60:], row_group_size=11)
    assert pq.ParquetFile(tmp_path / "pq" / "a.parquet").num_row_groups == 9
    ref = prepared(tmp_path, "ref", [tmp_path / "all.jsonl"], tokenizer=tokenizer)
    out = prepared(tmp_path, "out", [tmp_path / "pq"], tokenizer=tokenizer)
    assert len(list(out.glob("train_*.bin"))) > 1 or tokenizer == "char"
    assert shard_bytes(out) == shard_bytes(ref)
    assert (out / "tokenizer.json").read_bytes() == (ref / "tokenizer.json").read_bytes()
    for key in ("split", "documents", "splits"):
        assert read_meta(out)[key] == read_meta(ref)[key]
    assert read_meta(out)["split"] == ("documents" if tokenizer == "gpt2" else "tail")


def test_parquet_with_worker_processes_matches_jsonl_in_one_process(tmp_path, monkeypatch):
    monkeypatch.setattr(tokenize, "TASK_CHARS", 2_000)  # many tasks, finishing out of order
    texts = documents(200, seed=4)
    write_jsonl(tmp_path / "all.jsonl", texts)
    write_parquet(tmp_path / "all.parquet", texts, row_group_size=16)
    ref = prepared(tmp_path, "ref", [tmp_path / "all.jsonl"])
    data = DataConfig(dataset="w", tokenizer="gpt2", paths=[str(tmp_path / "all.parquet")],
                      prepared_dir=str(tmp_path / "w"))
    assert shard_bytes(prepare(data, progress=False, workers=2, shard_size=700)) == shard_bytes(ref)


def test_saved_datasets_folder_yields_the_tokens_of_jsonl_in_the_order_state_json_lists(tmp_path):
    texts = documents(120, seed=5)
    saved = write_saved_dataset(tmp_path / "saved", texts, num_shards=3)
    state = json.loads((saved / "state.json").read_text())
    files = [f["filename"] for f in state["_data_files"]]
    assert files == [f"data-0000{i}-of-00003.arrow" for i in range(3)]
    ref = prepared(tmp_path, "ref", [write_jsonl(tmp_path / "all.jsonl", texts)])
    assert shard_bytes(prepared(tmp_path, "out", [saved])) == shard_bytes(ref)

    # the files are read in the order state.json gives, not by name
    state["_data_files"].reverse()
    (saved / "state.json").write_text(json.dumps(state))
    rows_per_file = [len(list(_rows(saved / f, "text"))) for f in files]
    pieces, start = [], 0
    for n in rows_per_file:
        pieces.append(texts[start:start + n])
        start += n
    reversed_texts = [t for piece in reversed(pieces) for t in piece]
    ref2 = prepared(tmp_path, "ref2", [write_jsonl(tmp_path / "rev.jsonl", reversed_texts)])
    assert shard_bytes(prepared(tmp_path, "out2", [saved])) == shard_bytes(ref2) != shard_bytes(ref)


def test_saved_datasets_are_read_without_the_datasets_package(tmp_path, monkeypatch):
    texts = documents(30, seed=6)
    saved = write_saved_dataset(tmp_path / "saved", texts, num_shards=2)
    ref = prepared(tmp_path, "ref", [write_jsonl(tmp_path / "all.jsonl", texts)])
    monkeypatch.setitem(sys.modules, "datasets", None)  # importing it now fails
    assert shard_bytes(prepared(tmp_path, "out", [saved])) == shard_bytes(ref)


def test_a_datasetdict_folder_is_refused_naming_its_splits_and_a_split_folder_is_read(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    texts = documents(40, seed=7)
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": texts}),
        "test": datasets.Dataset.from_dict({"text": texts[:5]}),
    }).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError) as exc:
        prepared(tmp_path, "out", [tmp_path / "dd"])
    assert one_line(exc) == (f"data.paths[0]: {tmp_path / 'dd'}: a datasets DatasetDict with splits train, test; "
                             f"give one split's folder in data.paths, e.g. {tmp_path / 'dd' / 'train'}")
    assert not (tmp_path / "out").exists()
    ref = prepared(tmp_path, "ref", [write_jsonl(tmp_path / "all.jsonl", texts)])
    assert shard_bytes(prepared(tmp_path, "out", [tmp_path / "dd" / "train"])) == shard_bytes(ref)


def test_text_column_picks_the_parquet_column_and_the_jsonl_field(tmp_path, capsys):
    texts = documents(50, seed=8)
    write_parquet(tmp_path / "c.parquet", texts, column="content")
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": "not this", "content": t}) + "\n" for t in texts))
    ref = prepared(tmp_path, "ref", [write_jsonl(tmp_path / "all.jsonl", texts)])
    assert shard_bytes(prepared(tmp_path, "pq", [tmp_path / "c.parquet"], text_column="content")) == shard_bytes(ref)
    assert shard_bytes(prepared(tmp_path, "js", [tmp_path / "c.jsonl"], text_column="content")) == shard_bytes(ref)
    # another column is another corpus: prepared again, saying why
    data = DataConfig(dataset="js", tokenizer="gpt2", paths=[str(tmp_path / "c.jsonl")],
                      prepared_dir=str(tmp_path / "js"))
    prepare(data, progress=True, workers=1, shard_size=700)
    assert "the text column changed (content -> text); preparing again" in capsys.readouterr().err
    assert read_meta(tmp_path / "js")["documents"] == 50 and shard_bytes(tmp_path / "js") != shard_bytes(ref)


# ----------------------------------------------------------------------------- streaming, resume, fingerprint


def test_parquet_is_read_one_row_group_at_a_time(tmp_path):
    write_parquet(tmp_path / "a.parquet", documents(50), row_group_size=8)
    batches = list(_table_batches(tmp_path / "a.parquet", "text"))
    assert [len(values) for values, _ in batches] == [8, 8, 8, 8, 8, 8, 2]
    # the file's bytes are shared out over the row groups, so the progress bar ends at 100%
    assert sum(n for _, n in batches) == (tmp_path / "a.parquet").stat().st_size


def test_saved_dataset_batches_account_for_every_byte_of_their_files(tmp_path):
    saved = write_saved_dataset(tmp_path / "saved", documents(3000), num_shards=2)
    for f in sorted(saved.glob("*.arrow")):
        batches = list(_table_batches(f, "text"))
        assert len(batches) > 1 and sum(len(v) for v, _ in batches) == 1500
        assert sum(n for _, n in batches) == f.stat().st_size


def test_interrupted_parquet_prepare_resumes_to_the_uninterrupted_shards(tmp_path, monkeypatch):
    write_parquet(tmp_path / "a.parquet", documents(300, seed=9), row_group_size=32)
    data = DataConfig(dataset="d", tokenizer="gpt2", paths=[str(tmp_path / "a.parquet")],
                      prepared_dir=str(tmp_path / "p"))
    reference = shard_bytes(prepare(attrs.evolve(data, prepared_dir=str(tmp_path / "ref")),
                                    progress=False, workers=1, shard_size=1000))
    write = _ShardWriter._write
    calls = {"n": 0}

    def crash_after_four(self, ids, next_pos):
        write(self, ids, next_pos)
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(_ShardWriter, "_write", crash_after_four)
    with pytest.raises(KeyboardInterrupt):
        prepare(data, progress=False, workers=1, shard_size=1000)
    monkeypatch.setattr(_ShardWriter, "_write", write)
    assert (tmp_path / "p" / "progress.json").exists() and not (tmp_path / "p" / "meta.json").exists()
    prepare(data, progress=False, workers=1, shard_size=1000)
    assert shard_bytes(tmp_path / "p") == reference


def test_a_changed_parquet_file_is_prepared_again(tmp_path, capsys):
    path = write_parquet(tmp_path / "a.parquet", documents(40, seed=1))
    data = DataConfig(dataset="d", tokenizer="gpt2", paths=[str(path)], prepared_dir=str(tmp_path / "p"))
    prepare(data, progress=False, shard_size=700)
    before = split_tokens(tmp_path / "p", "train")
    write_parquet(path, documents(40, seed=2))
    prepare(data, progress=True, shard_size=700)
    assert f"{path.resolve()} changed" in capsys.readouterr().err
    assert split_tokens(tmp_path / "p", "train").tolist() != before.tolist()


# ----------------------------------------------------------------------------- errors


def test_a_missing_column_is_one_line_naming_the_file_and_its_columns(tmp_path):
    path = write_parquet(tmp_path / "a.parquet", ["x"] * 20, column="body")
    with pytest.raises(DataError) as exc:
        prepared(tmp_path, "p", [path])
    assert one_line(exc) == (f"{path}: no column 'text' (columns: id, body); "
                             "set data.text_column to the one holding the text")
    assert not (tmp_path / "p").exists()  # refused before anything was written
    saved = write_saved_dataset(tmp_path / "saved", ["x"] * 20)
    with pytest.raises(DataError, match=r"data-00000-of-00003.arrow: no column 'body' \(columns: text, id\)") as exc:
        prepared(tmp_path, "p", [saved], text_column="body")
    one_line(exc)


def test_a_column_that_is_not_text_is_one_line_naming_its_type(tmp_path):
    path = write_parquet(tmp_path / "a.parquet", ["x"] * 20)
    with pytest.raises(DataError) as exc:
        prepared(tmp_path, "p", [path], text_column="id")
    assert one_line(exc) == (f"{path}: column 'id' holds int64, expected strings; "
                             "set data.text_column to the one holding the text")


def test_a_null_text_is_one_line_naming_the_row(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": ["a", "b", None, "d"] * 5}), path, row_group_size=3)
    with pytest.raises(DataError) as exc:
        prepared(tmp_path, "p", [path])
    assert one_line(exc) == f"{path}: row 2: 'text' is None, expected a string"


def test_a_file_that_is_not_parquet_is_one_line(tmp_path):
    (tmp_path / "a.parquet").write_text("not parquet at all")
    with pytest.raises(DataError) as exc:
        prepared(tmp_path, "p", [tmp_path / "a.parquet"])
    assert one_line(exc).startswith(f"{tmp_path / 'a.parquet'}: not a readable parquet file (")


def test_without_pyarrow_parquet_input_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    path = write_parquet(tmp_path / "a.parquet", ["x"] * 20)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if it were not installed
    with pytest.raises(DataError) as exc:
        prepared(tmp_path, "p", [path])
    assert one_line(exc) == (f"data.paths[0]: {path}: reading parquet files and datasets folders needs pyarrow: "
                             "pip install playattention[parquet]")
    monkeypatch.chdir(tmp_path)
    assert main(["prepare", "--input", "a.parquet", "--out", "q", "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == ("error: data.paths[0]: a.parquet: reading parquet files and datasets "
                                               "folders needs pyarrow: pip install playattention[parquet]")
    # text files need no pyarrow
    write_jsonl(tmp_path / "t.jsonl", ["hello"])
    assert main(["prepare", "--input", "t.jsonl", "--out", "t", "--quiet"]) == 0


def test_a_state_json_naming_a_missing_file_is_one_line(tmp_path):
    saved = write_saved_dataset(tmp_path / "saved", ["x"] * 20, num_shards=2)
    (saved / "data-00001-of-00002.arrow").unlink()
    with pytest.raises(DataError) as exc:
        prepared(tmp_path, "p", [saved])
    assert one_line(exc) == f"data.paths[0]: {saved}: state.json lists data-00001-of-00002.arrow, which is missing"
