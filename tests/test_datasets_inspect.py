import pytest
from PIL import Image

from difftrain.cli import main
from difftrain.data import DataError
from difftrain.data.inspect import guess_kind, inspect_source
from difftrain.data.shards import write_shards
from tests.test_datasets_cifar import write_cifar10
from tests.test_datasets_fonts import write_fonts_npz
from tests.test_datasets_shards import make_folder


def _preview_ok(path, min_side=32):
    with Image.open(path) as img:
        assert min(img.size) >= min_side


def test_folder_counts_sizes_and_unreadable(tmp_path):
    root = make_folder(tmp_path / "imgs", per_class=3)
    Image.new("L", (5, 7)).save(root / "dog" / "odd.png")
    (root / "cat" / "broken.png").write_bytes(b"nope")
    r = inspect_source(str(root), preview=tmp_path / "p.png")
    assert r.kind == "folder" and r.counts == {"all": 7} and r.class_names == ["cat", "dog"]
    assert r.class_counts["all"] == {"cat": 3, "dog": 4}
    assert r.sizes["8x8 RGB"] == 6 and r.sizes["5x7 L"] == 1
    assert len(r.unreadable) == 1 and "broken.png" in r.unreadable[0]
    _preview_ok(tmp_path / "p.png")
    text = r.format()
    assert "unreadable 1" in text and "broken.png" in text


def test_every_source_kind(tmp_path):
    write_cifar10(tmp_path / "c10")
    write_fonts_npz(tmp_path / "f.npz", n_fonts=2)
    make_folder(tmp_path / "imgs")
    write_shards(tmp_path / "imgs", tmp_path / "sh", 4)
    cases = {
        "digits": ("digits", {"train": 1257, "test": 540}),
        str(tmp_path / "c10"): ("cifar10", {"train": 20, "test": 6}),
        str(tmp_path / "f.npz"): ("fonts", {"train": 26, "test": 26}),
        str(tmp_path / "sh"): ("shards", {"all": 10, "shards": 3}),
        str(tmp_path / "sh" / "shard-{000000..000002}.tar"): ("shards", None),
        str(tmp_path / "imgs"): ("folder", {"all": 10}),
    }
    for i, (source, (kind, counts)) in enumerate(cases.items()):
        assert guess_kind(source) == kind, source
        r = inspect_source(source, preview=tmp_path / f"p{i}.png")
        if counts:
            assert r.counts == counts, source
        assert sum(r.sizes.values()) > 0 and r.preview
        _preview_ok(r.preview)
    r = inspect_source(str(tmp_path / "imgs"), name="celebahq", preview=None)
    assert r.class_names == [] and r.counts == {"all": 10} and r.preview is None
    with pytest.raises(DataError, match="neither"):
        guess_kind(str(tmp_path / "missing"))


def test_cli_inspect(tmp_path, capsys):
    write_fonts_npz(tmp_path / "f.npz", n_fonts=3)
    assert main(["data", "inspect", str(tmp_path / "f.npz"), "--preview", str(tmp_path / "g.png")]) == 0
    out = capsys.readouterr().out
    assert "kind     fonts" in out and "classes  26: A, B" in out and "unreadable 0" in out
    assert (tmp_path / "g.png").is_file()
    assert main(["data", "inspect", str(tmp_path / "nothing")]) == 2
    assert "neither" in capsys.readouterr().err


def test_celebahq_is_an_unlabelled_folder(tmp_path):
    from difftrain.config import DataConfig
    from difftrain.data import load_data

    make_folder(tmp_path / "celeba")  # sub-folders are not classes here
    s = load_data(DataConfig(name="celebahq", path=str(tmp_path / "celeba"), image_size=4, test_fraction=0.2))
    assert s.num_classes == 0 and len(s.train) == 8 and len(s.test) == 2 and s.train.images.shape[1:] == (3, 4, 4)
