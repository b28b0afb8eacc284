"""Fuzzing the inputs (issue #14): random config values, random options of `sample` / `eval` / `data inspect`,
and damaged files (samples .npz, checkpoints, safetensors exports, tar shards, fonts files).

Each input must either work or give a clean error: a ConfigError / DataError / ... from the library, and from
the CLI exit status 2 with `error:` on stderr, never a traceback. Hypothesis runs derandomized (the same
examples on every run) with few examples, so the file takes well under a minute once the tiny run exists.
"""

import io
import math
import tarfile

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from difftrain.checkpoint import CheckpointError, load_checkpoint
from difftrain.cli import main
from difftrain.config import Config, ConfigError, _all_keys, config_from_dict, load_config
from difftrain.data import DataError
from difftrain.data.fonts import read_fonts_file
from difftrain.data.shards import read_shard, write_shards
from difftrain.evaluation.samples import SamplesError, load_npz
from difftrain.generation import write_npz
from tests.test_eval_digits import eval_cache  # noqa: F401  (the shared, session-scoped classifier cache)

BASE = settings(derandomize=True, deadline=None, database=None, max_examples=40,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def fuzz(examples: int) -> settings:
    return settings(BASE, max_examples=examples)
CLEAN_ERRORS = (ConfigError, DataError, CheckpointError, SamplesError)

# Values that have broken parsers before: non-finite and huge numbers, signs, empty and odd text, YAML syntax.
NASTY = ["0", "-1", "1", "2", "3", "nan", "inf", "-inf", ".nan", ".inf", "1e309", "-0", "0.5", "1e-9", "abc", "",
         " ", "null", "true", "[]", "[0]", "[1, 2]", "[0.5, -1]", "{a: 1}", "1,2", "1-", "-", "9-0", "0-9", "1,,2",
         "99999999999999999999", "ddim0", "ddim2", "2,1", "ema", "raw", "0.9", "[", "'", "\x00", "é"]


# --- config values ----------------------------------------------------------------------------

@fuzz(60)
@given(key=st.sampled_from(_all_keys(Config)) | st.text(max_size=12),
       value=st.sampled_from(NASTY) | st.integers(-10**12, 10**12).map(str) | st.floats().map(repr) | st.text(max_size=8))
def test_any_config_value_loads_or_is_a_config_error(key, value):
    try:
        cfg = load_config("digits", [f"{key}={value}"])
    except ConfigError:
        return
    # What is accepted can be stored and read back: config.yaml and checkpoints hold it.
    assert config_from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


# --- command-line options ---------------------------------------------------------------------

def run_main(capsys, argv):
    """Run the CLI in this process: (exit status, stderr). Any exception other than argparse's exit fails the test."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, err


def assert_clean(rc, err):
    event(f"exit status {rc}")  # pytest --hypothesis-show-statistics shows how many runs succeeded
    assert rc in (0, 2), err
    assert "Traceback" not in err
    if rc == 2:
        assert "error:" in err


def options(pool: dict[str, st.SearchStrategy]) -> st.SearchStrategy:
    """A random subset of the options in `pool`, each with a drawn value, as an argv list."""
    return st.lists(st.sampled_from(sorted(pool)), unique=True, max_size=4).flatmap(
        lambda names: st.tuples(*(pool[n] for n in names)).map(
            lambda values: [f"{n}={v}" for n, v in zip(names, values)]))


SMALL = st.sampled_from(["0", "-1", "1", "2", "nan", "abc", "", "1e3", "99999999999999999999"])
FEW = st.sampled_from(["0", "-1", "1", "2", "3", "nan", "abc", "", "-0"])  # counts that make real work stay small
SAMPLE_OPTIONS = {
    "--n": FEW, "--steps": FEW, "--batch-size": SMALL, "--seed": SMALL,
    "--sampler": st.sampled_from(["ddim", "euler", "heun", "dpmpp-2m", "dpmpp-2m-sde", "dpm", ""]),
    "--respacing": st.sampled_from(["ddim2", "ddim0", "3", "2,1", "0", "abc", "", "1000000", "ddim", "1,0"]),
    "--guidance": st.sampled_from(["0", "1", "3", "-2", "1e300", "nan", "inf", "abc"]),
    "--guidance-interval": st.sampled_from(["0.1,0.7", "0,1", "0.5,inf", "0.9,0.1", "a,b", "1", "nan,1", "-1,2", ""]),
    "--guidance-interval-t": st.sampled_from(["0.1,0.7", "0,1", "0.9,0.1", "0.5,inf", "nan,1", ""]),
    "--eta": st.sampled_from(["0", "1", "1e300", "-1", "nan"]),
    "--variance": st.sampled_from(["small", "large", "learned", "auto", "x"]),
    "--spacing": st.sampled_from(["leading", "trailing", "linspace", "karras", "x"]),
    "--classes": st.sampled_from(["all", "3", "0-9", "9-0", "1,4,7", "", "-", "1-", "a", "10", "-1", "1,,2", "0-999999999"]),
    "--ema": st.sampled_from(["ema", "raw", "0.999", "0.5", "abc", "nan", ""]),
    "--format": st.sampled_from(["grid", "npz", "png-dir", "gif", ""]),
    "--device": st.sampled_from(["cpu", "auto", "bogus", "cuda:99", ""]),
    "--trajectory-frames": FEW,
}


@fuzz(25)
@given(argv=options(SAMPLE_OPTIONS))
def test_sample_options_work_or_exit_2(tiny_run, tmp_path, capsys, argv):
    if not any(a.startswith("--n=") for a in argv):
        argv = [*argv, "--n=2"]
    if not any(a.startswith("--steps=") for a in argv):
        argv = [*argv, "--steps=2"]
    rc, err = run_main(capsys, ["sample", tiny_run, *argv, "--quiet", "--out", tmp_path / "out"])
    assert_clean(rc, err)


EVAL_OPTIONS = {
    "--n": FEW, "--steps": FEW, "--batch-size": SMALL, "--seed": SMALL,
    "--guidance": st.sampled_from(["0", "3", "1e300", "nan", "-inf"]), "--sampler": st.sampled_from(["ddim", "euler", "x"]),
    "--metric": st.sampled_from(["digits", "fid", "x"]),
    "--ema": st.sampled_from(["ema", "raw", "abc"]), "--device": st.sampled_from(["cpu", "bogus"]),
    "--inception-weights": st.sampled_from(["/nonexistent.pth", ""]),
}


@pytest.fixture
def samples_npz(tmp_path):
    from difftrain.data.digits import load_digits_splits

    test = load_digits_splits(8).test
    return write_npz(test.images[:40], test.labels[:40], tmp_path / "s.npz")


@fuzz(15)
@given(argv=options(EVAL_OPTIONS), source=st.sampled_from(["run", "samples", "both", "npz-as-run", "none", "missing"]))
def test_eval_options_work_or_exit_2(tiny_run, samples_npz, eval_cache, monkeypatch, capsys, argv, source):  # noqa: F811
    monkeypatch.setenv("DIFFTRAIN_CACHE", str(eval_cache))
    inputs = {"run": [tiny_run], "samples": ["--samples", samples_npz], "both": [tiny_run, "--samples", samples_npz],
             "npz-as-run": [samples_npz], "none": [], "missing": [samples_npz.with_name("nope.pt")]}[source]
    argv = argv if any(a.startswith("--n=") for a in argv) else [*argv, "--n=4"]
    if not any(a.startswith("--steps=") for a in argv):
        argv = [*argv, "--steps=2"]
    rc, err = run_main(capsys, ["eval", *inputs, *argv, "--quiet"])
    assert_clean(rc, err)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """One of each kind `data inspect` reads: an image folder, shards, a fonts file."""
    root = tmp_path_factory.mktemp("sources")
    for c in ("a", "b"):
        (root / "imgs" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (6 + i, 8), (40 * i, 0, 0)).save(root / "imgs" / c / f"{i}.png")
    write_shards(root / "imgs", root / "shards", 4)
    np.savez(root / "fonts.npz", images=np.full((2, 26, 8, 8), 255, np.uint8))
    return root


INSPECT_OPTIONS = {
    "--name": st.sampled_from(["folder", "shards", "fonts", "digits", "mnist", "cifar10", "celebahq", "x"]),
    "--image-size": SMALL, "--per-class": SMALL, "--limit": SMALL,
    "--preview": st.sampled_from(["", "p.png", "sub/p.png"]),
}


@fuzz(25)
@given(argv=options(INSPECT_OPTIONS),
       source=st.sampled_from(["imgs", "imgs/a", "shards", "shards/shards.json", "shards/shard-000000.tar", "fonts.npz",
                               "digits", "nope", "nope.tar", "nope.npz"]))
def test_data_inspect_options_work_or_exit_2(sources, tmp_path, monkeypatch, capsys, argv, source):
    monkeypatch.chdir(tmp_path)  # the preview grid lands here
    path = source if source == "digits" else sources / source
    rc, err = run_main(capsys, ["data", "inspect", path, *argv])
    assert_clean(rc, err)


# --- damaged files ----------------------------------------------------------------------------

def damaged(data: bytes) -> st.SearchStrategy:
    """`data` truncated, with bytes overwritten, or replaced by random bytes."""
    n = len(data)
    truncated = st.integers(0, n - 1).map(lambda k: data[:k])
    flipped = st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, 255)), min_size=1, max_size=8).map(
        lambda edits: _overwrite(data, edits))
    return truncated | flipped | st.binary(max_size=600)


def _overwrite(data: bytes, edits) -> bytes:
    b = bytearray(data)
    for i, v in edits:
        b[i] = v
    return bytes(b)


def _npz_bytes() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, np.zeros((3, 4, 4, 1), np.uint8), np.arange(3))
    return buf.getvalue()


def _fonts_bytes() -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, images=np.full((2, 26, 4, 4), 255, np.uint8), fonts=np.array(["a", "b"]))
    return buf.getvalue()


def _shard_bytes() -> bytes:
    buf = io.BytesIO()
    png = io.BytesIO()
    Image.new("L", (4, 4), 9).save(png, format="PNG")
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key in ("0", "1"):
            for name, payload in ((f"{key}.png", png.getvalue()), (f"{key}.cls", b"1")):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def _checkpoint_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save({"format": "difftrain-checkpoint", "version": 1, "step": 3, "config": {"train": {"lr": 0.1}},
                "model": {"w": torch.ones(3)}}, buf)
    return buf.getvalue()


def _safetensors_bytes() -> bytes:
    from safetensors.torch import save

    return save({"w": torch.ones(3)}, metadata={"step": "3"})


@fuzz(30)
@given(data=damaged(_npz_bytes()))
def test_damaged_samples_npz(tmp_path, data):
    (tmp_path / "s.npz").write_bytes(data)
    try:
        images, labels = load_npz(tmp_path / "s.npz")
    except SamplesError as e:
        assert "s.npz" in str(e)
        return
    assert images.dtype == torch.uint8 and images.ndim == 4


@fuzz(30)
@given(data=damaged(_fonts_bytes()))
def test_damaged_fonts_file(tmp_path, data):
    (tmp_path / "f.npz").write_bytes(data)
    try:
        images, fonts = read_fonts_file(tmp_path / "f.npz")
    except DataError as e:
        assert "f.npz" in str(e)
        return
    assert images.dtype == np.uint8 and images.shape[1] == 26 and len(fonts) == len(images)


@fuzz(30)
@given(data=damaged(_shard_bytes()))
def test_damaged_tar_shard(tmp_path, data):
    (tmp_path / "s.tar").write_bytes(data)
    try:
        images, labels, bad = read_shard(str(tmp_path / "s.tar"), 4, 1, num_classes=2, expected=2)
    except DataError as e:
        assert "s.tar" in str(e)
        return
    assert len(images) + len(bad) >= 2 and all(0 <= int(y) < 2 for y in labels)


@fuzz(30)
@given(data=damaged(_checkpoint_bytes()) | damaged(_safetensors_bytes()))
def test_damaged_checkpoint_or_safetensors(tmp_path, data):
    (tmp_path / "step-0000003.pt").write_bytes(data)
    try:
        state = load_checkpoint(tmp_path / "step-0000003.pt")
    except CheckpointError as e:
        assert "step-0000003.pt" in str(e)
        return
    assert isinstance(state, dict) and state["format"] == "difftrain-checkpoint"


@fuzz(10)
@given(cut=st.floats(0, 1))
def test_truncated_run_checkpoint_in_the_cli(tiny_run, tmp_path, capsys, cut):
    ckpt = sorted((tiny_run / "checkpoints").glob("step-*.pt"))[-1].read_bytes()
    path = tmp_path / "step-0000020.pt"
    path.write_bytes(ckpt[: math.floor(cut * (len(ckpt) - 1))])
    rc, err = run_main(capsys, ["sample", path, "--n=1", "--steps=1", "--quiet", "--out", tmp_path / "g.png"])
    assert rc == 2 and "step-0000020.pt" in err and "Traceback" not in err
