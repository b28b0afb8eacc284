"""Sample quality during training (train.eval_every, training/evaluate.py) and the report page at the end."""

import json

import pytest
import torch
from PIL import Image

from difftrain.checkpoint import list_checkpoints, load_checkpoint
from difftrain.config import ConfigError, load_config
from difftrain.training import Engine
from difftrain.training.best import fingerprint
from difftrain.training.distributed import World
from difftrain.training.evaluate import Evaluator
from difftrain.training.metrics import read_metrics
from tests.test_autoencoder import TINY_RUN as TINY_AUTOENCODER
from tests.test_engine_resume import SMALL, assert_tensors_equal, final_state, make_trainer, stop_after

pytestmark = pytest.mark.usefixtures("one_thread")

EVAL = ["train.eval_samples=50", "sample.batch_size=50"]


@pytest.fixture(autouse=True)
def offline_metrics(tmp_path_factory, monkeypatch):
    """The classifier cached once per session in a test folder; no Inception weights (FID never runs)."""
    monkeypatch.setenv("DIFFTRAIN_CACHE", str(tmp_path_factory.getbasetemp() / "difftrain-cache"))
    monkeypatch.setenv("DIFFTRAIN_INCEPTION_WEIGHTS", str(tmp_path_factory.getbasetemp() / "no-inception.pth"))


def eval_rows(run_dir):
    """The evaluation values of each step that has them."""
    rows = [{k: v for k, v in r.items() if k == "step" or k.startswith("eval_")} for r in read_metrics(run_dir)]
    return [r for r in rows if "eval_n" in r]


def test_scores_are_logged_every_n_steps_and_at_the_end_with_a_report(tmp_path, capsys):
    make_trainer(tmp_path, "train.steps=11", "train.eval_every=5", *EVAL).run()
    rows = eval_rows(tmp_path)
    assert [r["step"] for r in rows] == [5, 10, 11]
    for r in rows:
        assert r["eval_n"] == 50 and 0 <= r["eval_accuracy"] <= 1 and 0.9 < r["eval_accuracy_test"] <= 1
        assert r["eval_frechet_distance"] > r["eval_frechet_floor"] > 0 and 0 <= r["eval_near_copy_fraction"] <= 1
    best = json.loads((tmp_path / "checkpoints" / "best.json").read_text())
    scores = {r["step"]: r["eval_frechet_distance"] for r in rows}
    assert best["key"] == "eval_frechet_distance" and best["value"] == min(scores.values())
    assert scores[best["step"]] == best["value"]
    state = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert state["step"] == best["step"] and state["best"] == {k: v for k, v in best.items() if k != "checkpoint"}
    assert best["checkpoint"] == fingerprint(tmp_path / "checkpoints" / "best.pt")  # best.json describes best.pt
    assert best["settings"]["n"] == 50 and best["settings"]["sampler"] == "dpmpp-2m" and best["settings"]["seed"] == 0
    err = capsys.readouterr().err
    assert err.count("no FID/KID") == 1 and "scoring with the classifier metric" in err
    assert err.rstrip().endswith(f"Report page: {tmp_path / 'report.html'}")  # the run's last line
    page = (tmp_path / "report.html").read_text()
    assert "Sample quality" in page and 'aria-label="frechet distance"' in page and "eval_frechet_floor" in page
    assert 'aria-label="accuracy"' in page and "eval_n = 50" in page  # the sample count is listed, not drawn


def test_resume_is_bitwise_exact_with_evaluation_on(tmp_path):
    args = ("train.steps=12", "train.eval_every=4", *EVAL)
    make_trainer(tmp_path / "whole", *args).run()
    first = make_trainer(tmp_path / "split", *args)
    stop_after(first, 7)  # (a stop on an evaluation step skips its scores: test_signals_cut_the_evaluation_short)
    first.run()
    assert first.step == 7
    make_trainer(tmp_path / "split", *args).run()
    a, b = final_state(tmp_path / "whole"), final_state(tmp_path / "split")
    for key in ("model", "emas", "optimizer", "data", "rng", "counters"):
        assert_tensors_equal(a[key], b[key], key)
    assert eval_rows(tmp_path / "whole") == eval_rows(tmp_path / "split")
    assert [r["step"] for r in eval_rows(tmp_path / "whole")] == [4, 8, 12]
    best = [json.loads((tmp_path / d / "checkpoints" / "best.json").read_text()) for d in ("whole", "split")]
    assert [b.pop("checkpoint") for b in best]  # (the files differ: elapsed time)
    assert best[0] == best[1]


def test_the_best_checkpoint_survives_pruning(tmp_path, monkeypatch):
    scores = {3: 2.0, 6: 1.0, 9: 4.0, 12: 3.0}  # the best is step 6; later ones are worse
    monkeypatch.setattr(Evaluator, "score", lambda self: {"eval_n": 2, "eval_frechet_distance": scores[self.last_step]})
    make_trainer(tmp_path, "train.steps=12", "train.eval_every=3", "train.checkpoint_every=2",
                 "train.keep_checkpoints=1").run()
    ckpt = tmp_path / "checkpoints"
    assert [p.name for p in list_checkpoints(ckpt)] == ["step-0000012.pt"]
    record = json.loads((ckpt / "best.json").read_text())
    assert (record["step"], record["key"], record["value"]) == (6, "eval_frechet_distance", 1.0)
    best = load_checkpoint(ckpt / "best.pt")
    assert best["step"] == 6 and best["best"]["value"] == 1.0
    assert not torch.equal(next(iter(best["model"].values())), next(iter(final_state(tmp_path)["model"].values())))
    # a resumed run keeps comparing with the recorded best
    scores.update({15: 1.5})
    make_trainer(tmp_path, "train.steps=15", "train.eval_every=3", "train.keep_checkpoints=1").run()
    assert json.loads((ckpt / "best.json").read_text())["step"] == 6


def test_without_a_metric_one_notice_and_training_goes_on(tmp_path, capsys):
    for c, name in enumerate(("cat", "dog")):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (8, 8), (20 * (c * 6 + i),) * 3).save(tmp_path / "data" / name / f"{i}.png")
    run = tmp_path / "run"
    make_trainer(run, "data.name=folder", f"data.path={tmp_path / 'data'}", "train.steps=6", "train.eval_every=2",
                 *EVAL).run()
    err = capsys.readouterr().err
    assert err.count("train.eval_every:") == 1
    line = next(ln for ln in err.splitlines() if "train.eval_every:" in ln)
    assert "no classifier metric for data.name=folder" in line and "no FID/KID" in line
    assert "training goes on without evaluation" in line
    assert not eval_rows(run) and (run / "weights-ema.safetensors").is_file()
    assert not (run / "checkpoints" / "best.pt").exists()


def test_what_cannot_be_evaluated_is_refused_before_training(tmp_path):
    cfg = load_config("digits", [f"run_dir={tmp_path}", *SMALL, "train.eval_every=5", "train.eval_sampler=nope"])
    with pytest.raises(ConfigError, match="train.eval_sampler.*nope.*ddim"):
        Evaluator(cfg, None, World(), torch.device("cpu"), tmp_path)
    cfg = load_config(None, [f"run_dir={tmp_path}", *TINY_AUTOENCODER, "train.eval_every=5"])
    with pytest.raises(ConfigError, match="autoencoder run.*train.eval_every=0"):  # the autoencoder task's hook
        Engine(cfg)
    assert not (tmp_path / "checkpoints").exists()
    with pytest.raises(ConfigError, match="train.eval_samples"):
        load_config("digits", ["train.eval_samples=1"])


def test_a_report_that_cannot_be_written_only_warns(tmp_path, monkeypatch, capsys):
    import difftrain.report as report

    def broken(run_dir, out=None):
        raise OSError("disk full")

    monkeypatch.setattr(report, "write_report", broken)
    with pytest.warns(UserWarning, match="could not write the report page.*disk full"):
        Engine(load_config("digits", [f"run_dir={tmp_path}", *SMALL, "train.steps=2"])).run()
    assert "Report page: not written (OSError: disk full)" in capsys.readouterr().err
    assert (tmp_path / "weights-ema.safetensors").is_file()


# --- the best checkpoint: best.json derived from best.pt (training/best.py) -----------------------------------
def fake_best(ckpt, step=6, value=1.0, settings=None):
    """A best.pt holding the record of `step` (no weights: best.py only reads its "best" entry)."""
    from difftrain.checkpoint import save_checkpoint

    ckpt.mkdir(parents=True, exist_ok=True)
    record = {"step": step, "key": "eval_frechet_distance", "value": value, "settings": settings or {}}
    save_checkpoint({"step": step, "best": record}, ckpt / "best.pt")
    return record


def aside(ckpt):
    """{name: bytes} of the files moved to checkpoints/best-aside-*/."""
    return {p.name: p.read_bytes() for p in sorted(ckpt.glob("best-aside-*/*"))}


@pytest.mark.parametrize("text", ['"a string"', "null", "[1, 2]", "not json {",
                                  '{"step": 6, "key": "eval_frechet_distance", "value": NaN}',
                                  '{"step": "six", "key": "eval_frechet_distance", "value": "low"}'])
def test_a_malformed_best_json_is_moved_aside_and_rebuilt_from_best_pt(tmp_path, text):
    from difftrain.training.best import BestCheckpoint

    ckpt = tmp_path / "checkpoints"
    record = fake_best(ckpt, step=9, value=0.5)
    (ckpt / "best.json").write_text(text)
    with pytest.warns(UserWarning, match="best.json' is unusable.*moved best.json aside"):
        got = BestCheckpoint(ckpt).reconcile()
    assert {k: got[k] for k in record} == record and got["checkpoint"] == fingerprint(ckpt / "best.pt")
    assert json.loads((ckpt / "best.json").read_text()) == got
    assert aside(ckpt) == {"best.json": text.encode()}  # kept, not deleted


def test_a_nan_best_is_replaced_by_the_next_score(tmp_path, monkeypatch):
    """A NaN in best.json (and in best.pt's own record) once meant no score ever beat it."""
    from difftrain.checkpoint import save_checkpoint

    ckpt = tmp_path / "checkpoints"
    make_trainer(tmp_path, "train.steps=1", "train.eval_every=0").run()  # a run to resume: step 1's checkpoint
    save_checkpoint({"step": 1, "best": {"step": 1, "key": "eval_frechet_distance", "value": float("nan")}},
                    ckpt / "best.pt")
    (ckpt / "best.json").write_text('{"step": 1, "key": "eval_frechet_distance", "value": NaN}')
    monkeypatch.setattr(Evaluator, "score", lambda self: {"eval_n": 2, "eval_frechet_distance": 7.0})
    with pytest.warns(UserWarning, match="value nan is not a finite number"):
        make_trainer(tmp_path, "train.steps=3", "train.eval_every=3").run()
    assert json.loads((ckpt / "best.json").read_text())["value"] == 7.0
    assert load_checkpoint(ckpt / "best.pt")["best"]["step"] == 3
    assert set(aside(ckpt)) == {"best.pt", "best.json"}


def test_best_json_out_of_step_with_best_pt_is_rebuilt_or_moved_aside(tmp_path):
    from difftrain.training.best import BestCheckpoint

    ckpt = tmp_path / "checkpoints"
    fake_best(ckpt, step=6, value=1.0)
    BestCheckpoint(ckpt).write_json(json.loads('{"step": 6, "key": "eval_frechet_distance", "value": 1.0}'))
    old_json = (ckpt / "best.json").read_bytes()
    fake_best(ckpt, step=9, value=0.5)  # best.pt replaced, then killed before best.json was
    with pytest.warns(UserWarning, match="does not describe"):
        assert BestCheckpoint(ckpt).reconcile()["step"] == 9
    assert aside(ckpt) == {"best.json": old_json}
    (ckpt / "best.pt").unlink()  # deleted by hand: the record alone describes nothing
    with pytest.warns(UserWarning, match="no .*best.pt' beside it"):
        assert BestCheckpoint(ckpt).reconcile() is None
    assert not (ckpt / "best.json").exists()
    (ckpt / "best.pt").write_bytes(b"garbage")  # unreadable: moved aside with its record
    (ckpt / "best.json").write_bytes(old_json)
    with pytest.warns(UserWarning, match="truncated or corrupt.*a new best"):
        assert BestCheckpoint(ckpt).reconcile() is None
    assert not (ckpt / "best.pt").exists() and not (ckpt / "best.json").exists()
    assert len(list(ckpt.glob("best-aside-*/best.pt"))) == 1


def test_a_changed_evaluation_setting_starts_a_new_best(tmp_path, monkeypatch, capsys):
    scores = {3: 1.0, 6: 2.0, 9: 5.0}  # worse later: only a new best can be step 9
    monkeypatch.setattr(Evaluator, "score", lambda self: {"eval_n": self.n, "eval_frechet_distance": scores[self.last_step]})
    make_trainer(tmp_path, "train.steps=6", "train.eval_every=3").run()
    ckpt = tmp_path / "checkpoints"
    assert json.loads((ckpt / "best.json").read_text())["step"] == 3
    with pytest.warns(UserWarning, match=r"other evaluation settings \(n: 500 -> 20\).*new best"):
        make_trainer(tmp_path, "train.steps=9", "train.eval_every=3", "train.eval_samples=20").run()
    record = json.loads((ckpt / "best.json").read_text())
    assert (record["step"], record["value"], record["settings"]["n"]) == (9, 5.0, 20)
    assert set(aside(ckpt)) == {"best.pt", "best.json"}
    assert json.loads(aside(ckpt)["best.json"])["step"] == 3


def test_an_out_of_step_best_json_is_found_when_training_starts(tmp_path, monkeypatch, capsys):
    ckpt, seen = tmp_path / "checkpoints", []
    monkeypatch.setattr(Evaluator, "score", lambda self: seen.append((ckpt / "best.json").is_file()) or {})
    make_trainer(tmp_path, "train.steps=2", "train.eval_every=0").run()  # a run to resume: step 2's checkpoint
    fake_best(ckpt, step=2, value=0.5)
    make_trainer(tmp_path, "train.steps=3", "train.eval_every=100").run()
    assert "best.json' is missing; rebuilt it from the record inside best.pt (step 2" in capsys.readouterr().err
    assert seen == [True]  # rebuilt before the only evaluation (the final one)
    assert json.loads((ckpt / "best.json").read_text())["step"] == 2


def test_the_fingerprint_of_best_pt_sees_one_changed_weight(tmp_path):
    """Size + SHA-256 of the zip's tail (its directory holds each entry's CRC-32): one float differs -> it differs."""
    from difftrain.checkpoint import save_checkpoint

    w = torch.zeros(300_000)  # 1.2 MB of tensor data: more than the hashed tail
    save_checkpoint({"model": {"w": w}}, tmp_path / "a.pt")
    w[0] = 1.0
    save_checkpoint({"model": {"w": w}}, tmp_path / "b.pt")
    a, b = fingerprint(tmp_path / "a.pt"), fingerprint(tmp_path / "b.pt")
    assert a["bytes"] == b["bytes"] and a != b


def test_make_demo_draws_a_quality_curve():
    """`make demo` scores the EMA a few times, so the first report page a user opens has a quality curve
    beside the loss; the evaluations fall on the run's steps, the last one at its end."""
    from pathlib import Path

    makefile = (Path(__file__).parents[1] / "Makefile").read_text()
    line = next(ln for ln in makefile.splitlines() if "difftrain train digits" in ln)
    overrides = [a for a in line.split() if "=" in a and not a.startswith("run_dir")]
    cfg = load_config("digits", overrides)
    every, steps = cfg.train.eval_every, cfg.train.steps
    assert 0 < every and steps // every >= 3 and steps % every == 0, (every, steps)
    assert cfg.train.eval_samples <= 250  # light: a small part of the demo's time
