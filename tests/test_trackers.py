"""Experiment trackers: TensorBoard event files, an offline W&B run and metrics.csv get every metric of
metrics.jsonl at the same steps; a tracker whose package is missing is a one-line recipe error."""
import csv
import glob
import json
import struct

import pytest

from toolkit import recipe as recipe_module
from toolkit.errors import ConfigError
from toolkit.recipe import load_recipe
from toolkit.trainer import train

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")


def wandb_history(run_dir) -> list[dict]:
    """The history rows of an offline W&B run, read from its .wandb file (a LevelDB-style log of
    protobuf records: a 7-byte file header, then records in 32 KiB blocks, each with a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = glob.glob(f"{run_dir}/wandb/offline-run-*/run-*.wandb")
    raw, block, pos, part, rows = open(path, "rb").read(), 32768, 7, b"", []
    assert raw[:4] == b":W&B"
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a record header never straddles blocks: the rest is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        part += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            part = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def assert_same(got: dict, expected: dict) -> None:
    """The same metrics, each at the same steps with the same values."""
    assert set(got) == set(expected)
    for key, by_step in expected.items():
        assert got[key] == pytest.approx(by_step), key


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, tiny_recipe):
    recipe = tiny_recipe(tmp_path_factory.mktemp("trackers"), {
        "train.max_steps": 4, "train.eval_interval": 2, "train.log_interval": 2,
        "train.trackers": {"tensorboard": True, "csv": True, "wandb": {"project": "tests", "mode": "offline"}}})
    summary = train(load_recipe(recipe), progress=False)
    assert summary["status"] == "finished", summary
    rows = [json.loads(line) for line in open(f"{summary['run_dir']}/metrics.jsonl")]
    expected = {}  # "<type>/<key>" -> {step: value}, every number of metrics.jsonl
    for row in rows:
        for key, value in row.items():
            if key not in ("type", "step") and isinstance(value, (int, float)):
                expected.setdefault(f"{row['type']}/{key}", {})[row["step"]] = value
    return summary["run_dir"], expected


@pytest.mark.slow
def test_tensorboard_gets_every_metric_at_the_steps_of_metrics_jsonl(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, expected = tracked
    events = EventAccumulator(f"{run_dir}/tensorboard")
    events.Reload()
    assert_same({tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}, expected)
    assert sorted(expected["train/loss"]) == [1, 2, 3, 4] and sorted(expected["eval/val_loss"]) == [0, 2, 4]


@pytest.mark.slow
def test_an_offline_wandb_run_gets_every_metric_at_the_steps_of_metrics_jsonl(tracked):
    run_dir, expected = tracked
    got: dict = {}
    for row in wandb_history(run_dir):
        for key, value in row.items():
            if not key.startswith("_"):
                got.setdefault(key, {})[row["_step"]] = value
    assert_same(got, expected)


@pytest.mark.slow
def test_metrics_csv_has_a_column_per_metric_and_a_row_per_line(tracked):
    run_dir, expected = tracked
    with open(f"{run_dir}/metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    got: dict = {}
    for row in rows:
        for key, value in row.items():
            if key != "step" and value != "":
                got.setdefault(key, {})[int(row["step"])] = float(value)
    assert_same(got, expected)


def test_a_tracker_whose_package_is_missing_is_a_one_line_error_naming_the_extra(tmp_path, tiny_recipe, monkeypatch):
    monkeypatch.setitem(recipe_module.TRACKER_PACKAGES, "wandb", ("no_such_wandb", "wandb"))
    path = tiny_recipe(tmp_path, {"train.trackers": {"wandb": {"project": "x"}}})
    with pytest.raises(ConfigError) as exc:
        load_recipe(path)
    assert exc.value.lines == [f"{path}: $.train.trackers.wandb: needs the no_such_wandb package, which is not "
                               "installed: pip install 'playattention[wandb]'"]
