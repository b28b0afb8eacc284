"""Issue #24: a full disk while `sample --format png-dir`, `eval --json` or `ema --json` writes. Each fails with
`difftrain: error: cannot write WHAT 'PATH': No space left on device` (exit 2), leaves no temporary file and keeps
the files that were there before. The disk fills part-way: the file opened after `ok_files` others writes half of
its bytes, then raises OSError(ENOSPC), as a real write does."""

import builtins
import errno
import io
import json
import os
from pathlib import Path

import pytest
import torch

from difftrain.checkpoint import CheckpointError, checkpoint_name, save_checkpoint
from difftrain.cli import main
from difftrain.config import load_config
from difftrain.generation import write_png_dir
from difftrain.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


class _FillingFile:
    """A file whose writes stop with ENOSPC after half of the first one (the partial file is left on disk)."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        self._f.write(data[: len(data) // 2])
        self._f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def disk_full_after(monkeypatch, ok_files: int, under: Path, only: str | None = None) -> list[str]:
    """Files opened for writing under `under` (named `only`, if given) fill the disk once `ok_files` of them were
    written; returns the names opened (builtins.open: Pillow, atomic_write; io.open: Path.write_text)."""
    real, real_os_open, opened, counted, paths = builtins.open, os.open, [], [], {}

    def fake_os_open(path, flags, *args, **kwargs):  # atomic_write opens its temporary file O_EXCL | O_NOFOLLOW
        fd = real_os_open(path, flags, *args, **kwargs)
        paths[fd] = path
        return fd

    def fake_open(file, mode="r", *args, **kwargs):
        f = real(file, mode, *args, **kwargs)
        name = paths.get(file) if isinstance(file, int) else file  # open(fd) of a file os.open made
        if any(c in mode for c in "wax+") and isinstance(name, (str, Path)) and Path(name).is_relative_to(under):
            opened.append(Path(name).name)
            if only in (None, Path(name).name):
                counted.append(name)
                if len(counted) > ok_files:
                    return _FillingFile(f)
        return f

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    return opened


def snapshot_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def tiny_run(run_dir: Path) -> Path:
    cfg = load_config(None, [f"run_dir={run_dir}", "model.in_channels=1", "model.image_size=8", "model.num_classes=0",
                             "model.model_channels=16", "model.channel_mult=[1,2]", "model.norm_groups=8",
                             "sample.sampler=ddim", "sample.steps=2"])
    weights = build_model(cfg.model).state_dict()
    ema = {"rate": 0.999, "updates": 1, "weights": weights}
    (run_dir / "checkpoints").mkdir(parents=True)
    save_checkpoint({"config": cfg.to_dict(), "step": 1, "model": weights, "ema": ema, "emas": [ema]},
                    run_dir / "checkpoints" / checkpoint_name(1))
    return run_dir


def test_png_dir_on_a_full_disk_keeps_the_folder_as_it_was(tmp_path, monkeypatch):
    out = tmp_path / "samples"
    out.mkdir()
    (out / "000000.png").write_bytes(b"an earlier sample")
    (out / "notes.txt").write_text("mine")
    before = snapshot_files(tmp_path)
    images = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    opened = disk_full_after(monkeypatch, 2, tmp_path)
    with pytest.raises(CheckpointError, match=r"cannot write samples '[^']*samples/000002.png': No space left on device"):
        write_png_dir(images, None, out)
    assert len(opened) == 3 and snapshot_files(tmp_path) == before  # no partial PNG, no temporary folder
    monkeypatch.undo()
    write_png_dir(images, None, out)  # room again: the same call writes all of them
    assert sorted(p.name for p in out.iterdir()) == [f"{i:06d}.png" for i in range(5)] + ["notes.txt"]
    assert not list(tmp_path.glob(".*"))


def test_sample_png_dir_on_a_full_disk_exits_2(tmp_path, monkeypatch, capsys):
    run = tiny_run(tmp_path / "run")
    out = tmp_path / "out" / "samples"
    disk_full_after(monkeypatch, 1, tmp_path / "out")
    code = main(["sample", str(run), "--n", "3", "--format", "png-dir", "--out", str(out), "--quiet", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and f"difftrain: error: cannot write samples '{out}/000001.png': No space left on device" in err
    assert not out.exists() and not [p for p in (tmp_path / "out").iterdir()]


@pytest.mark.parametrize("command", ["eval", "ema"])
def test_json_output_on_a_full_disk_keeps_the_earlier_file(tmp_path, monkeypatch, capsys, command):
    """`eval --json` and `ema --score --json`: the earlier JSON stays whole (the scoring itself is stubbed out)."""
    import difftrain.cli_ema as cli_ema
    import difftrain.evaluation.report as report
    from difftrain.training import phema

    out = tmp_path / "out" / "result.json"
    out.parent.mkdir()
    out.write_text('{"earlier": true}\n')
    if command == "eval":
        monkeypatch.setattr(report, "evaluate_samples", lambda *a, **k: {"metric": "digits", "n": 2})
        monkeypatch.setattr(report, "format_report", lambda result: "scored")
        from difftrain.generation import write_npz

        npz = write_npz(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), None, tmp_path / "s.npz")
        argv = ["eval", "--samples", str(npz), "--json", str(out)]
        what = "eval results"
    else:
        result = phema.Reconstruction(0.1, 6.94, 1, tmp_path / "w.safetensors", 1)
        monkeypatch.setattr(phema, "reconstruct", lambda *a, **k: [result])
        monkeypatch.setattr(cli_ema, "score", lambda args, results: [{"sigma_rel": 0.1}])
        monkeypatch.setattr(cli_ema, "format_table", lambda rows: "table")
        argv = ["ema", str(tmp_path), "--sigma-rel", "0.1", "--score", "--json", str(out)]
        what = "scores"
    disk_full_after(monkeypatch, 0, out.parent)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and f"difftrain: error: cannot write {what} '{out}': No space left on device" in err
    assert json.loads(out.read_text()) == {"earlier": True} and [p.name for p in out.parent.iterdir()] == ["result.json"]
