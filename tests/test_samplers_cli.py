"""`difftrain sample` with the new options and `difftrain eval --nll`, on the tiny run of conftest."""

import json

import pytest
from PIL import Image

from tests.conftest import run_cli


@pytest.mark.slow
def test_sample_options_and_trajectory(tiny_run, tmp_path):
    gif, strip, out = tmp_path / "t.gif", tmp_path / "t.png", tmp_path / "g.png"
    proc = run_cli("sample", str(tiny_run), "--n", "6", "--batch-size", "4", "--sampler", "dpmpp-2m", "--steps", "5",
                   "--spacing", "karras", "--guidance-interval", "0.1,0.7", "--classes", "1-3", "--ema", "raw",
                   "--device", "cpu", "--trajectory", str(gif), "--out", str(out))
    assert "denoising trajectory (gif" in proc.stdout
    assert Image.open(gif).n_frames >= 5 and Image.open(out).size[0] > 0
    run_cli("sample", str(tiny_run), "--n", "3", "--sampler", "ddpm", "--respacing", "ddim10", "--quiet",
            "--trajectory", str(strip), "--trajectory-frames", "4", "--out", str(out))
    w, h = Image.open(strip).size
    assert w > h  # 3 rows of 4 frames
    bad = run_cli("sample", str(tiny_run), "--guidance-interval", "0.9,0.1", check=False)
    assert bad.returncode == 2 and "--guidance-interval" in bad.stderr
    bad = run_cli("sample", str(tiny_run), "--sampler", "dpm", check=False)
    assert bad.returncode == 2 and "unknown sampler 'dpm'" in bad.stderr and "dpmpp-2m" in bad.stderr  # SAMPLERS lists them
    assert "Traceback" not in bad.stderr


@pytest.mark.slow
def test_guidance_interval_options_in_sigma_and_in_t(tiny_run, tmp_path):
    """--guidance-interval is in sigma (0,inf: every step guided, the images of no interval), --guidance-interval-t
    the older t / T (0,1: the same); a narrow sigma interval changes the images; both at once is refused."""
    import numpy as np

    def draw(*options: str) -> np.ndarray:
        out = tmp_path / f"s{len(list(tmp_path.iterdir()))}.npz"
        run_cli("sample", str(tiny_run), "--n", "4", "--steps", "4", "--quiet", "--format", "npz", "--out", str(out),
                *options)
        return np.load(out)["arr_0"]

    plain = draw()
    assert np.array_equal(draw("--guidance-interval", "0,inf"), plain)
    assert np.array_equal(draw("--guidance-interval-t", "0,1"), plain)
    assert not np.array_equal(draw("--guidance-interval", "1,inf"), plain)
    bad = run_cli("sample", str(tiny_run), "--guidance-interval", "1,inf", "--guidance-interval-t", "0.2,0.6",
                  check=False)
    assert bad.returncode == 2 and "difftrain: error: sample.guidance_interval_sigma: set together" in bad.stderr


@pytest.mark.slow
def test_eval_nll_reports_bits_per_dim(tiny_run, tmp_path):
    out = tmp_path / "nll.json"
    proc = run_cli("eval", "--nll", str(tiny_run), "--n", "4", "--quiet", "--json", str(out))
    assert "bits/dim" in proc.stdout
    r = json.loads(out.read_text())
    assert r["n"] == 4 and r["timesteps"] == 1000 and 0 < r["bits_per_dim"] < 100 and r["conditional"]
