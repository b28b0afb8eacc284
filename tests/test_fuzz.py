"""Fuzzing the inputs (issue #14): random config values, random options of `sample` / `eval` / `data inspect`,
and damaged files (samples .npz, checkpoints, safetensors exports, tar shards, fonts files).

Each input must either work or give a clean error: a ConfigError / DataError / ... from the library, and from
the CLI exit status 2 with `error:` on stderr, never a traceback. Hypothesis runs derandomized (the same
examples on every run) with few examples, so the file takes well under a minute once the tiny run exists.
"""

import io
import json
import math
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from difftrain.checkpoint import CheckpointError, load_checkpoint
from difftrain.cli import main
from difftrain.config import Config, ConfigError, DataConfig, _all_keys, config_from_dict, load_config
from difftrain.data import DataError, load_data
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


# --- metrics.jsonl and config.yaml as the report and the resume read them ----------------------------------

METRIC_NUMBERS = (st.integers(-2**70, 2**70) | st.floats() | st.booleans() | st.none() | st.text(max_size=4)
                  | st.sampled_from([10**400, 1e308, -1e308, 1e300, 5e-324, 0, -0.0]))
METRIC_ROWS = st.fixed_dictionaries(
    {"step": st.integers(0, 60) | st.sampled_from([-1, 2**53, 2**53 + 1, 10**400, 1.5, "3", None, True])},
    optional={k: METRIC_NUMBERS for k in ("loss", "lr", "grad_norm", "images_per_s", "time", "eval_fid")})
METRIC_LINES = st.lists(
    METRIC_ROWS.map(lambda row: json.dumps(row).encode())
    | st.sampled_from([b"", b" ", b"{", b"null", b"[1, 2]", b'{"step": 1}\xff', b'{"step": 2, "x": "\xe9"}',
                       b"[" * 100_000, b'{"step": 4, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                       b'{"step": 5, "loss": NaN, "lr": Infinity}', b'{"step": 6, "loss": ' + b"9" * 5000 + b"}"])
    | st.binary(max_size=40),
    max_size=12)


def metrics_file(lines: list[bytes], newline_at_end: bool) -> bytes:
    return b"\n".join(lines) + (b"\n" if newline_at_end and lines else b"")


@pytest.fixture(scope="module")
def report_run(tmp_path_factory):
    """A run directory for the report: a config.yaml and one metrics line (the tests replace either)."""
    run = tmp_path_factory.mktemp("report") / "run"
    run.mkdir()
    (run / "config.yaml").write_text(load_config("digits", ["train.batch_size=4"]).to_yaml())
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    return run


@fuzz(12)  # each draws a panel: ~0.2 s
@given(lines=METRIC_LINES, newline_at_end=st.booleans())
def test_random_metrics_lines_are_read_drawn_or_noted(report_run, lines, newline_at_end):
    from difftrain.report import ReportError, plots, summary
    from difftrain.report.rundata import MAX_STEP, MAX_VALUE, load_run

    (report_run / "metrics.jsonl").write_bytes(metrics_file(lines, newline_at_end))
    try:
        run = load_run(report_run)
    except ReportError as e:
        assert "holds no metrics lines" in str(e)
        return
    steps = [row["step"] for row in run.rows]
    assert steps == sorted(set(steps)) and all(type(s) is int and 0 <= s <= MAX_STEP for s in steps)
    for key in run.keys():
        assert all(math.isfinite(v) and abs(v) <= MAX_VALUE for v in run.series(key)[1])
    summary.progress(run)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's overflow warnings included
        svg = plots.draw(plots.Panel("loss", ["loss", "lr"], log=True), [run], chart_id="c")
    assert svg is None or svg.startswith("<svg")


@fuzz(40)
@given(lines=METRIC_LINES, newline_at_end=st.booleans(), step=st.integers(0, 70))
def test_random_metrics_lines_are_trimmed_on_resume(tmp_path, lines, newline_at_end, step):
    from difftrain.report.rundata import parse_metrics_line
    from difftrain.training.metrics import lines_up_to

    data = metrics_file(lines, newline_at_end)
    (tmp_path / "metrics.jsonl").write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the dropped damaged lines are named in a warning
        kept, gone = lines_up_to(tmp_path / "metrics.jsonl", step)
    complete = data.split(b"\n")[:-1]  # the lines that end in a newline
    out = kept.split(b"\n")[:-1]
    assert kept == b"" or kept.endswith(b"\n")
    assert len(out) + gone == len(data.split(b"\n")) - (data == b"" or data.endswith(b"\n"))
    it = iter(complete)
    assert all(any(line == c for c in it) for line in out)  # a subsequence of the complete lines, in order
    for line in out:
        assert parse_metrics_line(line.decode("utf-8"))[0]["step"] <= step


YAML_KEYS = st.sampled_from([k.split(".")[-1] for k in _all_keys(Config)] + ["train", "model", "x", "<<", "1"])
YAML_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=6) | st.sampled_from(NASTY),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(YAML_KEYS, inner, max_size=4), max_leaves=12)
YAML_TEXTS = (
    st.dictionaries(st.sampled_from(["model", "diffusion", "data", "train", "sample", "description", "run_dir", "x"]),
                    YAML_VALUES, max_size=5).map(lambda d: yaml.safe_dump(d, sort_keys=False))
    | st.lists(st.sampled_from(["train:", "  steps: 5", "  batch_size: abc", "model: &m [1, 2]", "data: *m", "x: *nope",
                                "a: &a [*a]", "- 1", "? [a]", "  : b", "!!python/object:os.system ls", "when: 2024-13-45",
                                "b: &b [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]", "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]",
                                "d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]",
                                "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]",
                                "description: [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]",
                                "deep: " + "[" * 200, "'", "\t", "\x00", "%YAML 1.1", "---", "description: é"]),
               max_size=8).map("\n".join)
    | st.text(max_size=60))


@fuzz(40)
@given(text=YAML_TEXTS)
def test_random_config_yaml_in_the_report(report_run, text):
    from difftrain.report.page import comparison_page, run_page
    from difftrain.report.rundata import load_run

    (report_run / "config.yaml").write_text(text, errors="surrogateescape")
    (report_run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    run = load_run(report_run)
    run.rows = [{"step": 1}]  # nothing to draw: the page's parts that read the config are tested
    page = run_page(run) + comparison_page([run, run])
    assert len(page) < 200_000 and "config.yaml" in page


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
GUIDE = st.sampled_from(["cfg", "auto", "none", "x", ""])
GUIDE_WEIGHTS = st.sampled_from(["ema", "raw", "ema-0.999", "ema-0.5", "ema-", "checkpoints/step-0000010.pt",
                                 "nope.pt", "config.yaml", "x.safetensors", "phema-0.1", "checkpoints", ""])
SAMPLE_OPTIONS = {
    "--n": FEW, "--steps": FEW, "--batch-size": SMALL, "--seed": SMALL,
    "--sampler": st.sampled_from(["ddim", "euler", "heun", "dpmpp-2m", "dpmpp-2m-sde", "dpm", ""]),
    "--respacing": st.sampled_from(["ddim2", "ddim0", "3", "2,1", "0", "abc", "", "1000000", "ddim", "1,0"]),
    "--guidance": st.sampled_from(["0", "1", "3", "-2", "1e300", "nan", "inf", "abc"]),
    "--guidance-interval": st.sampled_from(["0.1,0.7", "0,1", "0.5,inf", "0.9,0.1", "a,b", "1", "nan,1", "-1,2", ""]),
    "--guidance-interval-t": st.sampled_from(["0.1,0.7", "0,1", "0.9,0.1", "0.5,inf", "nan,1", ""]),
    "--guide": GUIDE, "--guide-weights": GUIDE_WEIGHTS,
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
    "--metric": st.sampled_from(["digits", "fid", "x"]), "--guide": GUIDE, "--guide-weights": GUIDE_WEIGHTS,
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


# --- shards.json contents (issue #24) -----------------------------------------------------------

@pytest.fixture(scope="module")
def shard_folder(tmp_path_factory):
    """shards/ with 2 shards of 2 samples (classes cat, dog), a copy outside it and a symlink leading there."""
    from tests.test_datasets_shards import make_folder

    root = tmp_path_factory.mktemp("shards-json")
    write_shards(make_folder(root / "imgs", per_class=2), root / "shards", 2)
    (root / "outside.tar").write_bytes((root / "shards" / "shard-000000.tar").read_bytes())
    (root / "shards" / "link-out.tar").symlink_to(root / "outside.tar")
    return root / "shards"


FILES = ["shard-000000.tar", "shard-000001.tar", "../outside.tar", "link-out.tar", "missing.tar", "", ".", "..",
         "./shard-000000.tar", "sub/../shard-000001.tar", "http://example.invalid/x.tar", "C:shard.tar", "a\\..\\b.tar"]
JSON_VALUES = st.none() | st.booleans() | st.integers(-3, 6) | st.floats(allow_nan=True) | st.text(max_size=6)


def mostly(good: st.SearchStrategy, bad: st.SearchStrategy) -> st.SearchStrategy:
    """`good` four times in five, else `bad` (a plain `|` lets a many-branched `bad` take most draws)."""
    return st.integers(0, 4).flatmap(lambda k: bad if k == 0 else good)


ENTRY = mostly(st.fixed_dictionaries({"file": mostly(st.sampled_from(FILES[:2]), st.sampled_from(FILES[2:]) | JSON_VALUES),
                                      "count": mostly(st.integers(0, 2), st.integers(-3, 6) | JSON_VALUES)}), JSON_VALUES)
CLASSES = mostly(st.sampled_from([["cat", "dog"], ["cat", "dog"], [], ["cat"], ["cat", "cat"], [1, 2], ["a", "b", "c"]]),
                 st.lists(st.sampled_from(["cat", "dog", ""]) | st.integers(-1, 2), max_size=3) | JSON_VALUES)


def _kind(message: str) -> str:
    """A short name of an error message for Hypothesis' statistics."""
    for word in ("damaged", "has the count", "relative path", "leads out", "lists no shards", "classes", "not found",
                 "No such file", "truncated", "label", "train.batch_size"):
        if word in message:
            return word
    return message[:60]


@fuzz(60)
@given(shards=mostly(st.lists(ENTRY, max_size=3), JSON_VALUES), classes=CLASSES,
       absolute=st.booleans())
def test_any_shards_json_loads_or_is_a_clean_error(shard_folder, shards, classes, absolute):
    """Whatever shards.json holds, the set loads and streams within its folder and classes, or a DataError /
    ConfigError names the index; a shard outside the folder is never read."""
    import json
    from pathlib import Path

    if absolute and isinstance(shards, list) and shards and isinstance(shards[0], dict):
        shards[0]["file"] = str(shard_folder.parent / "outside.tar")
    index = shard_folder / "shards.json"
    index.write_text(json.dumps({"format": "difftrain-shards", "version": 1, "classes": classes, "shards": shards}))
    try:
        data = load_data(DataConfig(name="shards", path=str(shard_folder), image_size=8))
        folder = shard_folder.resolve()
        assert all(Path(u).resolve().is_relative_to(folder) for u in data.train.urls)
        assert all(isinstance(c, int) and c >= 0 for c in data.train.counts)
        x, y = data.train.make_stream(min(2, len(data.train) or 2)).next()
    except (DataError, ConfigError) as e:
        event(_kind(str(e)))
        assert "shards.json" in str(e) or "shard '" in str(e) or "train.batch_size" in str(e), str(e)
        return
    event("loaded")
    assert x.shape[1:] == (3, 8, 8) and all(0 <= v < max(1, len(data.train.class_names)) for v in y.tolist())


# --- checkpoints/best.json ----------------------------------------------------------------------

_json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
                            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                            max_leaves=6)
_best_like = st.fixed_dictionaries({"step": _json_values | st.integers(-2, 20), "value": _json_values | st.floats(),
                                    "key": st.sampled_from(["eval_frechet_distance", "eval_fid", "loss", ""])},
                                   optional={"settings": _json_values, "checkpoint": _json_values})
_best_texts = (st.one_of(_json_values, _best_like).map(lambda v: json.dumps(v, allow_nan=True))
               | st.text(max_size=30) | st.binary(max_size=30).map(lambda b: b.decode("latin-1")))


@fuzz(60)
@given(text=_best_texts, with_pt=st.booleans())
def test_any_best_json_is_used_rebuilt_or_moved_aside(tmp_path, text, with_pt):
    import tempfile
    import warnings

    from difftrain.checkpoint import save_checkpoint
    from difftrain.training.best import BestCheckpoint, fingerprint, record_problem
    from difftrain.training.rundir import read_best

    ckpt = Path(tempfile.mkdtemp(dir=tmp_path)) / "checkpoints"
    ckpt.mkdir()
    if with_pt:
        save_checkpoint({"step": 4, "best": {"step": 4, "key": "eval_fid", "value": 2.5, "settings": {}}}, ckpt / "best.pt")
    (ckpt / "best.json").write_bytes(text.encode("utf-8", "surrogatepass"))
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    read_best(ckpt)  # the resume's reader never raises either
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        record = BestCheckpoint(ckpt).reconcile()
    if record is None:
        assert not (ckpt / "best.json").exists() and not with_pt
    else:
        assert record_problem(record) is None and record["checkpoint"] == fingerprint(ckpt / "best.pt")
        assert json.loads((ckpt / "best.json").read_text()) == record
    kept = [p.read_bytes() for p in ckpt.rglob("*") if p.is_file()]
    assert all(data in kept for data in before.values())  # nothing that was there is lost
