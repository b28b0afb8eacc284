"""Data read from URLs (data/remote.py): shards, folders and parquet over a local HTTP server (127.0.0.1),
fsspec's memory:// and file:// URLs, missing fsspec backends, and URLs that carry credentials. Offline."""

import sys

import pytest
import torch

from difftrain.cli import main
from difftrain.config import ConfigError, DataConfig, load_config
from difftrain.data import DataError, load_data, make_stream
from difftrain.data.remote import HTTPFile, list_files, read_bytes
from difftrain.data.shards import write_shards
from tests.http_server import Behaviour, serve
from tests.test_datasets_shards import make_folder, value_of


@pytest.fixture
def site(tmp_path):
    """tmp/site/imgs (a class folder of 10 images) and tmp/site/shards (4 shards + shards.json)."""
    make_folder(tmp_path / "site" / "imgs")
    write_shards(tmp_path / "site" / "imgs", tmp_path / "site" / "shards", 3)
    return tmp_path / "site"


def batches(path, n=4, batch=3, seed=2):
    stream = make_stream(load_data(DataConfig(name="shards", path=str(path), image_size=8)).train, batch, seed=seed)
    return [(value_of(x), y.tolist()) for x, y in (stream.next() for _ in range(n))]


def test_shards_over_http_stream_as_the_local_ones(site):
    local = batches(site / "shards")
    with serve(site) as (url, seen):
        assert batches(f"{url}/shards") == local  # the folder: shards.json found beside the shards
        assert batches(f"{url}/shards/shards.json") == local
        unindexed = f"{url}/shards/shard-{{000000..000003}}.tar"
        with pytest.warns(UserWarning, match="unlabelled"):
            data = load_data(DataConfig(name="shards", path=unindexed, image_size=8))
        stream = make_stream(data.train, 5)
        assert sorted(v for _ in range(2) for v in value_of(stream.next()[0])) == [10 * i for i in range(10)]


def test_a_dropped_connection_is_resumed_from_the_byte_reached(site):
    local = batches(site / "shards")
    with serve(site, Behaviour(drops={f"/shards/shard-00000{i}.tar": 1 for i in range(4)})) as (url, seen):
        assert batches(f"{url}/shards") == local  # every shard cut once: nothing lost, nothing skipped
    resumed = [r for path, r in seen.requests if path.endswith(".tar") and r]
    assert len(resumed) == 4 and all(r.startswith("bytes=") and int(r[6:-1]) > 0 for r in resumed)


def test_a_connection_that_always_drops_is_a_clear_error_naming_the_url(site):
    with serve(site, Behaviour(drops={"/shards/shard-000000.tar": 100})) as (url, _):
        with pytest.raises(DataError, match=r"shard-000000.tar' failed at byte \d+ of \d+ after 5 attempts"):
            read_bytes(f"{url}/shards/shard-000000.tar")
        with pytest.raises(DataError, match="shard-000000.tar' failed"):
            batches(f"{url}/shards", n=4, batch=10)


def test_a_drop_from_a_server_without_ranges_is_an_error_not_a_short_file(site):
    with serve(site, Behaviour(ranges=False, drops={"/shards/shard-000001.tar": 1})) as (url, _):
        with pytest.raises(DataError, match="ignores byte ranges"):
            read_bytes(f"{url}/shards/shard-000001.tar")
        assert read_bytes(f"{url}/shards/shard-000002.tar") == (site / "shards" / "shard-000002.tar").read_bytes()


def test_http_file_seeks_with_range_requests(site):
    data = (site / "shards" / "shard-000000.tar").read_bytes()
    with serve(site) as (url, seen):
        f = HTTPFile(f"{url}/shards/shard-000000.tar")
        assert f.size == len(data)
        f.seek(-100, 2)
        buf = bytearray(100)
        assert f.readinto(buf) == 100 and bytes(buf) == data[-100:]
        f.close()
        with pytest.raises(DataError, match="HTTP 404"):
            HTTPFile(f"{url}/shards/nope.tar")


def test_an_image_folder_over_http_reads_as_the_local_one(site):
    local = load_data(DataConfig(name="folder", path=str(site / "imgs"), image_size=8, test_fraction=0.0))
    with serve(site) as (url, _):
        assert list_files(f"{url}/imgs", (".png",)) == [f"{c}/{i}.png" for c in ("cat", "dog") for i in range(5)]
        remote = load_data(DataConfig(name="folder", path=f"{url}/imgs", image_size=8, test_fraction=0.0))
    assert remote.train.class_names == local.train.class_names == ["cat", "dog"]
    assert torch.equal(remote.train.images, local.train.images) and torch.equal(remote.train.labels, local.train.labels)


def test_an_image_lost_in_transfer_fails_the_load_instead_of_being_skipped(site):
    with serve(site, Behaviour(drops={"/imgs/dog/3.png": 100})) as (url, _):
        with pytest.raises(DataError, match=r"dog/3.png' failed at byte"):
            load_data(DataConfig(name="folder", path=f"{url}/imgs", image_size=8))


def test_fsspec_memory_and_file_urls(site):
    import fsspec

    local = batches(site / "shards")
    assert batches((site / "shards").as_uri()) == local  # file://
    fs = fsspec.filesystem("memory")
    try:
        for p in sorted((site / "shards").iterdir()):
            fs.pipe(f"/difftrain-test/shards/{p.name}", p.read_bytes())
        assert batches("memory://difftrain-test/shards") == local
        for p in sorted((site / "imgs").rglob("*.png")):
            fs.pipe(f"/difftrain-test/imgs/{p.parent.name}/{p.name}", p.read_bytes())
        cfg = dict(name="folder", image_size=8, test_fraction=0.0)
        remote = load_data(DataConfig(path="memory://difftrain-test/imgs", **cfg)).train
        mine = load_data(DataConfig(path=str(site / "imgs"), **cfg)).train
        assert remote.class_names == ["cat", "dog"] and torch.equal(remote.images, mine.images)
        with pytest.raises(DataError, match="not found"):
            read_bytes("memory://difftrain-test/shards/nope.tar")
    finally:
        fs.rm("/difftrain-test", recursive=True)


@pytest.mark.parametrize("url, package", [("s3://bucket/shards/shards.json", "s3fs"),
                                          ("gs://bucket/shards/shards.json", "gcsfs")])
def test_a_missing_fsspec_backend_names_the_package_to_install(url, package, monkeypatch):
    monkeypatch.setitem(sys.modules, package, None)  # absent even where it is installed: `import` raises ImportError
    with pytest.raises(DataError, match=rf"needs {package} .*pip install {package}"):
        load_data(DataConfig(name="shards", path=url, image_size=8))


SECRET_URLS = ["https://alice:hunter2@example.com/shards/", "https://example.com/shards/shards.json?token=hunter2",
               "s3://bucket/x.tar,https://example.com/a.tar?X-Amz-Signature=hunter2"]


@pytest.mark.parametrize("url", SECRET_URLS)
def test_a_url_with_credentials_is_refused_without_showing_them(url, tmp_path, capsys):
    for key in ("data.path", "data.test_path"):
        with pytest.raises(ConfigError, match=rf"{key}: a URL carrying credentials") as e:
            load_config("digits", [f"{key}={url}"])
        assert "hunter2" not in str(e.value) and "***" in str(e.value)
    run = tmp_path / "run"
    assert main(["train", "digits", f"run_dir={run}", "data.name=shards", f"data.path={url}"]) == 2
    err = capsys.readouterr().err
    assert "difftrain: error" in err and "hunter2" not in err and not run.exists()  # no config.yaml, no logs
    assert main(["data", "inspect", url]) == 2
    err = capsys.readouterr().err
    assert "credentials" in err and "hunter2" not in err


def test_data_inspect_reads_urls(site, capsys):
    with serve(site) as (url, _):
        assert main(["data", "inspect", f"{url}/shards", "--preview", ""]) == 0
        out = capsys.readouterr().out
        assert "kind     shards" in out and "all 10" in out and "classes  2: cat, dog" in out
        assert main(["data", "inspect", f"{url}/imgs", "--preview", ""]) == 0
        out = capsys.readouterr().out
        assert "kind     folder" in out and "all 10" in out and "8x8 RGB (10)" in out and "unreadable 0" in out


def test_parquet_over_http_reads_as_the_local_file(tmp_path, capsys):
    from tests.test_datasets_parquet import write_parquet

    write_parquet(tmp_path / "site" / "data" / "train-00000-of-00001.parquet", 20, row_group_size=6)
    cfg = dict(name="parquet", image_size=8, label_column="label")
    local = make_stream(load_data(DataConfig(path=str(tmp_path / "site"), **cfg)).train, 7, seed=4)
    with serve(tmp_path / "site") as (url, seen):
        data = load_data(DataConfig(path=f"{url}/", **cfg))
        assert data.train.class_names == ["zero", "one", "two"] and data.train.num_units == 4
        remote = make_stream(data.train, 7, seed=4)
        for _ in range(4):
            (a, ya), (b, yb) = local.next(), remote.next()
            assert torch.equal(a, b) and torch.equal(ya, yb)
        assert main(["data", "inspect", f"{url}/", "--label-column", "label", "--preview", ""]) == 0
        out = capsys.readouterr().out
        assert "kind     parquet" in out and "all 20, files 1, row groups 4" in out and "classes  3: zero, one, two" in out
    assert any(r for _, r in seen.requests)  # the footer and row groups were read with Range requests


def test_a_missing_file_url_is_named(tmp_path):
    with pytest.raises(DataError, match="not found: .*nope.tar"):
        load_data(DataConfig(name="shards", path=(tmp_path / "nope.tar").as_uri(), image_size=8))


def test_a_server_that_cannot_be_reached_is_an_error_naming_the_url():
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for path, name in ((f"http://127.0.0.1:{port}/shards", "shards"), (f"http://127.0.0.1:{port}/imgs", "folder")):
        with pytest.raises(DataError, match=rf"127.0.0.1:{port}/"):
            load_data(DataConfig(name=name, path=path, image_size=8))


def test_http_credentials_come_from_netrc(site, tmp_path, monkeypatch):
    import base64

    netrc = tmp_path / "home" / ".netrc"
    netrc.parent.mkdir()
    netrc.write_text("machine 127.0.0.1 login alice password hunter2\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("HOME", str(netrc.parent))
    with serve(site) as (url, seen):
        assert read_bytes(f"{url}/shards/shards.json") == (site / "shards" / "shards.json").read_bytes()
    assert seen.auth == ["Basic " + base64.b64encode(b"alice:hunter2").decode()]
