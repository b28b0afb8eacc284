import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from difftrain.cli import main
from difftrain.config import DataConfig
from difftrain.data import DataError, load_data, make_stream
from difftrain.data.shards import ShardStream, expand_braces, load_shard_set, read_shard, write_shards


def make_folder(root, per_class=5):
    """Two classes of 8x8 images, each image a distinct flat grey level."""
    for c, cls in enumerate(("cat", "dog")):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (8, 8), (10 * (c * per_class + i),) * 3).save(root / cls / f"{i}.png")
    return root


def value_of(x):  # batch in [-1, 1] -> the grey level of each image
    return ((x[:, 0, 0, 0] + 1) * 127.5).round().long().tolist()


@pytest.fixture
def shards(tmp_path):
    make_folder(tmp_path / "imgs")
    write_shards(tmp_path / "imgs", tmp_path / "shards", 3)
    return tmp_path / "shards"


def test_shards_are_webdataset_tars_and_round_trip(shards):
    meta = json.loads((shards / "shards.json").read_text())
    assert meta["classes"] == ["cat", "dog"] and [s["count"] for s in meta["shards"]] == [3, 3, 3, 1]
    with tarfile.open(shards / "shard-000000.tar") as tar:
        names = tar.getnames()
    assert names[0].endswith(".png") and names[1] == names[0].replace(".png", ".cls")
    images, labels = [], []
    for s in meta["shards"]:
        x, y, bad = read_shard(str(shards / s["file"]), 8, 3)
        images.append(x), labels.append(y)
        assert not bad
    x, y = torch.cat(images), torch.cat(labels)
    got = sorted(zip(x[:, 0, 0, 0].tolist(), y.tolist()))
    assert got == sorted((10 * i, 0 if i < 5 else 1) for i in range(10))


def test_stream_is_an_epoch_permutation_fixed_by_seed_and_resumable(shards):
    data = load_data(DataConfig(name="shards", path=str(shards), image_size=8))
    assert data.num_classes == 2 and data.channels == 3 and data.image_size == 8 and len(data.train) == 10
    stream = make_stream(data.train, 4, seed=3)
    assert isinstance(stream, ShardStream)
    seen = [v for _ in range(5) for v in value_of(stream.next()[0])]  # 20 = two epochs
    assert sorted(seen[:10]) == sorted(seen[10:]) == [10 * i for i in range(10)]
    assert seen[:10] != seen[10:]  # another permutation in epoch 1
    again = make_stream(data.train, 4, seed=3)
    assert [v for _ in range(5) for v in value_of(again.next()[0])] == seen
    # Resume mid-epoch, mid-shard.
    a = make_stream(data.train, 3, seed=5)
    a.next(), a.next()
    state = a.state_dict()
    expected = [value_of(a.next()[0]) for _ in range(4)]
    b = make_stream(data.train, 3, seed=5)
    b.load_state_dict(state)
    assert [value_of(b.next()[0]) for _ in range(4)] == expected


def test_worker_processes_keep_the_order(shards):
    one = load_shard_set(str(shards), 8)
    two = load_shard_set(str(shards), 8, num_workers=2, prefetch=1)
    a, b = one.make_stream(5, seed=1), two.make_stream(5, seed=1)
    assert [value_of(a.next()[0]) for _ in range(4)] == [value_of(b.next()[0]) for _ in range(4)]


def test_patterns_lists_and_validation_split(shards, tmp_path):
    assert expand_braces("a-{000..002}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar"]
    assert expand_braces("{x,y}-{1..2}") == ["x-1", "x-2", "y-1", "y-2"]
    with pytest.warns(UserWarning, match="unlabelled"):
        s = load_data(DataConfig(name="shards", path=str(shards / "shard-{000000..000001}.tar"), image_size=8))
    assert s.num_classes == 0 and len(s.train.urls) == 2
    s = load_data(DataConfig(name="shards", path=str(shards / "shards.json"), image_size=4,
                             test_path=str(shards / "shard-000003.tar")))
    assert s.test.images.shape == (1, 3, 4, 4) and s.test.class_names == ["cat", "dog"]
    with pytest.raises(DataError, match="not found"):
        load_data(DataConfig(name="shards", path=str(tmp_path / "nope-{0..1}.tar")))
    with pytest.raises(DataError, match="data.path"):
        load_data(DataConfig(name="shards"))


def test_unreadable_samples_are_skipped_with_a_warning(tmp_path):
    root = make_folder(tmp_path / "imgs", per_class=2)
    write_shards(root, tmp_path / "sh", 10)
    with tarfile.open(tmp_path / "sh" / "shard-000000.tar", "a") as tar:
        import io
        info = tarfile.TarInfo("zzz.png")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"junk"))
    stream = load_shard_set(str(tmp_path / "sh"), 8).make_stream(4)
    with pytest.warns(UserWarning, match="zzz"):
        x, y = stream.next()
    assert sorted(value_of(x)) == [0, 10, 20, 30]


def test_cli_shard(tmp_path, capsys):
    make_folder(tmp_path / "imgs")
    assert main(["data", "shard", str(tmp_path / "imgs"), str(tmp_path / "out"), "--shard-size", "4", "--image-size", "4"]) == 0
    assert "10 images in 3 shards" in capsys.readouterr().out
    x, _, _ = read_shard(str(tmp_path / "out" / "shard-000000.tar"), 4, 3)
    assert x.shape == (4, 3, 4, 4) and np.all(x.numpy() % 10 == 0)


@pytest.mark.slow  # two short training runs: ~15 s on an idle 2-core machine, more when shared
def test_training_loop_streams_shards_and_resumes(shards, tmp_path):
    from difftrain.checkpoint import load_checkpoint
    from difftrain.config import load_config
    from difftrain.training import train
    from tests.conftest import TINY

    over = [f"run_dir={tmp_path / 'run'}", "data.name=shards", f"data.path={shards}", "data.image_size=8",
            f"data.test_path={shards / 'shard-000003.tar'}", "train.steps=2", "train.batch_size=4",
            "train.checkpoint_every=0", "train.sample_every=0", "train.val_every=2", "train.device=cpu", *TINY[:3],
            "sample.steps=2", "train.progress=false", "train.tensorboard=false"]
    run = train(load_config("digits", over))
    state = load_checkpoint(sorted((run / "checkpoints").glob("*.pt"))[-1])
    assert (state["data"]["epoch"], state["data"]["offset"]) == (0, 8) and "shard" in state["data"]
    assert state["class_names"] == ["cat", "dog"]
    # Resuming continues the stream from the stored position: 16 images = one epoch of 10, then 6.
    over = [o.replace("train.steps=2", "train.steps=4") for o in over]
    train(load_config("digits", over))
    state = load_checkpoint(sorted((run / "checkpoints").glob("*.pt"))[-1])
    assert state["step"] == 4 and (state["data"]["epoch"], state["data"]["offset"]) == (1, 6)


# --- shards.json entries (issue #24) ------------------------------------------------------------

def edit_index(shards, edit):
    meta = json.loads((shards / "shards.json").read_text())
    edit(meta)
    (shards / "shards.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("count", [-1, -100, True])
def test_a_negative_shard_count_is_an_error_naming_the_index_and_entry(shards, count):
    edit_index(shards, lambda m: m["shards"][1].update(count=count))
    with pytest.raises(DataError, match=rf"shards.json': shards\[1\] \('shard-000001.tar'\) has the count {count}"):
        load_data(DataConfig(name="shards", path=str(shards), image_size=8))


@pytest.mark.parametrize("file", ["../outside.tar", "sub/../../outside.tar", "ABSOLUTE", "http://elsewhere/x.tar",
                                  "", "./shard-000000.tar"])
def test_a_shard_file_outside_the_index_folder_is_refused(shards, tmp_path, file):
    outside = tmp_path / "outside.tar"
    outside.write_bytes((shards / "shard-000000.tar").read_bytes())  # a readable shard: only the path is wrong
    file = str(outside) if file == "ABSOLUTE" else file
    edit_index(shards, lambda m: m["shards"][2].update(file=file))
    with pytest.raises(DataError, match=r"shards.json': shards\[2\] has the file .*relative path inside the index"):
        load_data(DataConfig(name="shards", path=str(shards), image_size=8))


def test_a_shard_symlink_leading_out_of_the_index_folder_is_refused(shards, tmp_path):
    outside = tmp_path / "outside.tar"
    outside.write_bytes((shards / "shard-000000.tar").read_bytes())
    (shards / "link.tar").symlink_to(outside)
    edit_index(shards, lambda m: m["shards"][0].update(file="link.tar"))
    with pytest.raises(DataError, match=r"shards\[0\] \('link.tar'\) leads out of the index's folder"):
        load_data(DataConfig(name="shards", path=str(shards / "shards.json"), image_size=8))
    (shards / "inside.tar").symlink_to(shards / "shard-000001.tar")  # a link within the folder is fine
    edit_index(shards, lambda m: m["shards"][0].update(file="inside.tar", count=3))
    assert len(load_data(DataConfig(name="shards", path=str(shards), image_size=8)).train) == 10


def test_an_index_without_classes_over_labelled_shards_is_an_error(shards):
    """`"classes": []` makes an unlabelled set (what `data shard` writes for class_from=none, every label 0);
    labelled shards under such an index would silently train an unconditional model."""
    edit_index(shards, lambda m: m.update(classes=[]))
    data = load_data(DataConfig(name="shards", path=str(shards), image_size=8))
    assert data.num_classes == 0
    with pytest.raises(DataError, match=r"has the label 1, but shards.json lists no classes \(\"classes\": \[\]"):
        stream = make_stream(data.train, 10, seed=0)
        stream.next()
    write_shards(shards.parent / "imgs", shards.parent / "plain", 4, class_from="none")
    plain = load_data(DataConfig(name="shards", path=str(shards.parent / "plain"), image_size=8))
    x, y = make_stream(plain.train, 10, seed=0).next()
    assert plain.num_classes == 0 and y.tolist() == [0] * 10


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(shards=[]), "lists no shards"),
    (lambda m: m.update(classes=["cat", "cat"]), "'classes' must be a list of distinct class names"),
    (lambda m: m.update(classes=[1, 2]), "'classes' must be a list of distinct class names"),
])
def test_an_index_without_shards_or_with_bad_class_names_is_an_error(shards, edit, message):
    edit_index(shards, edit)
    with pytest.raises(DataError, match=message):
        load_data(DataConfig(name="shards", path=str(shards), image_size=8))


def test_member_names_are_keys_never_paths_and_links_are_not_samples(tmp_path, monkeypatch):
    """Why the hand-written reader is safe without extraction checks (README: The WebDataset library): a member
    named ../x.png is read into memory as the sample '../x', nothing is written, and a symlink member is skipped."""
    import io

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (70, 70, 70)).save(buf, "PNG")
    png = buf.getvalue()
    path = tmp_path / "deep" / "s.tar"
    path.parent.mkdir()
    with tarfile.open(path, "w") as tar:
        for name, kind in (("../escape.png", tarfile.REGTYPE), ("link.png", tarfile.SYMTYPE), ("ok.png", tarfile.REGTYPE)):
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.SYMTYPE:
                info.linkname = "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = len(png)
                tar.addfile(info, io.BytesIO(png))
    monkeypatch.chdir(path.parent)
    x, y, bad = read_shard(str(path), 8, 3)
    assert len(x) == 2 and value_of(x.float() / 127.5 - 1) == [70, 70] and not bad
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["deep", "s.tar"]  # nothing extracted anywhere
