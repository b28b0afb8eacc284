"""data.name=parquet (data/parquet.py): image parquet files in the Hub's layout, written here with pyarrow."""

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from difftrain.cli import main
from difftrain.config import DataConfig
from difftrain.data import DataError, load_data, make_stream
from difftrain.data.shards import ShardStream
from tests.test_datasets_shards import value_of

NAMES = ["zero", "one", "two"]


def png(level: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (level,) * 3).save(buf, "PNG")
    return buf.getvalue()


def write_parquet(path, n, *, row_group_size=6, start=0, struct=True, labels="classlabel", image="image"):
    """n rows: image i is a flat grey 5 * (start + i), its label (start + i) % 3: a ClassLabel with the names
    NAMES in the `huggingface` schema metadata (as `datasets` writes it), plain strings, or none."""
    rows = []
    for i in range(start, start + n):
        row = {image: {"bytes": png(5 * i), "path": f"{i}.png"} if struct else png(5 * i)}
        if labels == "classlabel":
            row["label"] = i % 3
        elif labels == "strings":
            row["label"] = NAMES[i % 3]
        rows.append(row)
    table = pa.Table.from_pylist(rows)
    if labels == "classlabel":
        features = {image: {"_type": "Image"}, "label": {"names": NAMES, "_type": "ClassLabel"}}
        table = table.replace_schema_metadata({b"huggingface": json.dumps({"info": {"features": features}}).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def level_and_label(x, y):
    return list(zip(value_of(x), y.tolist()))


def test_hub_layout_with_class_label_names_streams_every_row_once_an_epoch(tmp_path):
    write_parquet(tmp_path / "data" / "train-00000-of-00002.parquet", 10)
    write_parquet(tmp_path / "data" / "train-00001-of-00002.parquet", 8, start=10)
    write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", 4, start=18)
    data = load_data(DataConfig(name="parquet", path=str(tmp_path), image_size=8, label_column="label",
                                test_path=str(tmp_path)))
    assert data.train.class_names == NAMES and len(data.train) == 18 and data.train.num_units == 4  # 6+4, 6+2 rows
    stream = make_stream(data.train, 4, seed=1)
    assert isinstance(stream, ShardStream)
    rows = [r for _ in range(9) for r in level_and_label(*stream.next())]  # 36 = two epochs
    expected = sorted((5 * i, i % 3) for i in range(18))
    assert sorted(rows[:18]) == sorted(rows[18:]) == expected and rows[:18] != rows[18:]
    assert data.test.class_names == NAMES and sorted(value_of(data.test.images.float() / 127.5 - 1)) == [90, 95, 100, 105]
    assert data.test.labels.tolist() == [0, 1, 2, 0]


def test_binary_images_and_string_labels_give_sorted_class_names(tmp_path):
    path = write_parquet(tmp_path / "plain.parquet", 9, struct=False, labels="strings", image="png")
    data = load_data(DataConfig(name="parquet", path=str(path), image_size=8, image_column="png", label_column="label"))
    assert data.train.class_names == ["one", "two", "zero"]
    x, y = make_stream(data.train, 9, seed=0).next()
    assert sorted(level_and_label(x, y)) == sorted((5 * i, ["one", "two", "zero"].index(NAMES[i % 3])) for i in range(9))
    unlabelled = load_data(DataConfig(name="parquet", path=str(path), image_size=8, image_column="png"))
    assert unlabelled.train.class_names == [] and make_stream(unlabelled.train, 9).next()[1].tolist() == [0] * 9


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume_gives_the_batches_of_an_unbroken_stream(tmp_path, workers):
    write_parquet(tmp_path / "train-0.parquet", 11, row_group_size=4)
    write_parquet(tmp_path / "train-1.parquet", 6, start=11, row_group_size=4)
    data = load_data(DataConfig(name="parquet", path=str(tmp_path), image_size=8, label_column="label",
                                num_workers=workers, prefetch=1))
    unbroken = make_stream(data.train, 5, seed=7, random_flip=True)
    whole = [unbroken.next() for _ in range(9)]  # 45 images: across row groups, files and two epoch ends
    for k in (1, 3, 4, 7):
        first = make_stream(data.train, 5, seed=7, random_flip=True)
        for _ in range(k):
            first.next()
        state = first.state_dict()
        assert set(state) == {"epoch", "offset", "shard", "item"}
        resumed = make_stream(data.train, 5, seed=7, random_flip=True)
        resumed.load_state_dict(state)
        for x, y in whole[k:k + 2]:
            rx, ry = resumed.next()
            assert torch.equal(rx, x) and torch.equal(ry, y)


def test_a_broken_file_is_an_error_naming_it(tmp_path):
    write_parquet(tmp_path / "train-0.parquet", 4)
    (tmp_path / "train-1.parquet").write_bytes(b"PAR1 but not really a parquet file")
    with pytest.raises(DataError, match=r"parquet file '.*train-1.parquet' is damaged or not a parquet file"):
        load_data(DataConfig(name="parquet", path=str(tmp_path), image_size=8))
    good = (tmp_path / "train-0.parquet").read_bytes()
    (tmp_path / "train-1.parquet").write_bytes(good[: len(good) // 2] + good[-8:])  # footer kept, data cut
    with pytest.raises(DataError, match="train-1.parquet"):
        data = load_data(DataConfig(name="parquet", path=str(tmp_path), image_size=8))
        stream = make_stream(data.train, 8)
        stream.next()


@pytest.mark.parametrize("key, column", [("image_column", "img"), ("label_column", "fine_label")])
def test_a_missing_column_is_an_error_naming_the_column_and_file(tmp_path, key, column):
    write_parquet(tmp_path / "train.parquet", 4)
    with pytest.raises(DataError, match=rf"'.*train.parquet' has no column '{column}' \(data.{key}\); "
                                        r"its columns: image, label"):
        load_data(DataConfig(name="parquet", path=str(tmp_path / "train.parquet"), image_size=8, **{key: column}))


def test_a_label_outside_the_class_label_names_or_the_training_classes_is_an_error(tmp_path):
    path = write_parquet(tmp_path / "train.parquet", 4)
    table = pq.read_table(path)
    table = table.set_column(1, "label", pa.array([0, 1, 5, 2]))
    pq.write_table(table.replace_schema_metadata(pq.read_schema(path).metadata), path)
    data = load_data(DataConfig(name="parquet", path=str(path), image_size=8, label_column="label"))
    with pytest.raises(DataError, match=r"train.parquet:row 2: the label 5 is outside the classes 0..2"):
        make_stream(data.train, 4).next()
    strings = write_parquet(tmp_path / "s" / "train.parquet", 2, labels="strings")  # zero, one
    other = write_parquet(tmp_path / "s" / "test.parquet", 3, labels="strings")  # zero, one, two
    with pytest.raises(DataError, match=r"test.parquet:row 2: the label 'two' is none of the classes"):
        load_data(DataConfig(name="parquet", path=str(strings), test_path=str(other), image_size=8, label_column="label"))


def test_an_undecodable_image_is_skipped_with_a_warning_naming_the_row(tmp_path):
    path = write_parquet(tmp_path / "train.parquet", 4, struct=False, labels="none")
    table = pq.read_table(path)
    table = table.set_column(0, "image", pa.array([png(0), b"junk", png(10), None], pa.binary()))
    pq.write_table(table, path)
    stream = make_stream(load_data(DataConfig(name="parquet", path=str(path), image_size=8)).train, 2)
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable sample\(s\): .*train.parquet:row [13]"):
        x, _ = stream.next()
    assert sorted(value_of(x)) == [0, 10]


def test_data_inspect_parquet(tmp_path, capsys):
    write_parquet(tmp_path / "ds" / "data" / "train-00000-of-00001.parquet", 9, row_group_size=4)
    preview = tmp_path / "out" / "p.png"
    assert main(["data", "inspect", str(tmp_path / "ds"), "--label-column", "label", "--preview", str(preview)]) == 0
    out = capsys.readouterr().out
    assert "kind     parquet" in out and "all 9, files 1, row groups 3" in out and "classes  3: zero, one, two" in out
    assert "8x8 RGB (9)" in out and "per class (all) min 3, max 3" in out and preview.is_file()
    assert main(["data", "inspect", str(tmp_path / "ds"), "--label-column", "nope", "--preview", ""]) == 2
    assert "has no column 'nope' (data.label_column)" in capsys.readouterr().err


@pytest.mark.slow  # two short training runs: ~15 s on an idle 2-core machine, more when shared
def test_training_streams_parquet_and_resumes_at_the_stored_position(tmp_path):
    from difftrain.checkpoint import load_checkpoint
    from difftrain.config import load_config
    from difftrain.training import train
    from tests.conftest import TINY

    write_parquet(tmp_path / "ds" / "train.parquet", 10, row_group_size=3)
    write_parquet(tmp_path / "ds" / "test.parquet", 3, start=10)
    over = [f"run_dir={tmp_path / 'run'}", "data.name=parquet", f"data.path={tmp_path / 'ds'}", "data.image_size=8",
            "data.label_column=label", f"data.test_path={tmp_path / 'ds'}", "train.steps=2", "train.batch_size=4",
            "train.checkpoint_every=0", "train.sample_every=0", "train.val_every=2", "train.device=cpu", *TINY[:3],
            "sample.steps=2", "train.progress=false", "train.tensorboard=false"]
    run = train(load_config("digits", over))
    state = load_checkpoint(sorted((run / "checkpoints").glob("*.pt"))[-1])
    assert (state["data"]["epoch"], state["data"]["offset"]) == (0, 8) and state["class_names"] == NAMES
    train(load_config("digits", [o.replace("train.steps=2", "train.steps=4") for o in over]))
    state = load_checkpoint(sorted((run / "checkpoints").glob("*.pt"))[-1])
    assert state["step"] == 4 and (state["data"]["epoch"], state["data"]["offset"]) == (1, 6)
