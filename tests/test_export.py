"""difftrain export and model.init_from against diffusers: the converted models compute what ours compute, the
exported scheduler samples what `generate` samples, an exported folder loads with diffusers alone, and a
diffusers UNet starts a run. Runs are tiny checkpoints written directly (random weights, so outputs are not 0)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DModel  # noqa: E402

from difftrain.checkpoint import checkpoint_name, save_checkpoint  # noqa: E402
from difftrain.config import ConfigError, load_config  # noqa: E402
from difftrain.data.memory import to_uint8  # noqa: E402
from difftrain.generation import generate  # noqa: E402
from difftrain.interop import export_run, init_weights  # noqa: E402
from difftrain.interop.convert import unet2d_config  # noqa: E402
from difftrain.interop.diffusers_export import (  # noqa: E402
    build_diffusers_model,
    call_diffusers,
    convert_model,
    load_for_export,
)
from difftrain.interop.schedulers import scheduler_config  # noqa: E402
from difftrain.models import build_model  # noqa: E402
from difftrain.processes import build_process, flow_sigmas, make_betas  # noqa: E402
from difftrain.samplers import PerSampleNoise  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

UNET = ["model.model_channels=16", "model.channel_mult=[1,2]", "model.norm_groups=8", "sample.steps=10"]
DIT = ["model.name=dit", "model.hidden_size=32", "model.depth=2", "model.num_heads=2", "diffusion.process=flow",
       "sample.sampler=euler", "sample.steps=10", "data.normalize=none"]
KINDS = {
    "unet": (UNET, 10), "unet_uncond": (UNET, 0),
    "unet_updown_sigma": (UNET + ["model.resblock_updown=true", "model.use_scale_shift_norm=false",
                                  "diffusion.learn_sigma=true", "model.out_channels=2", "sample.sampler=ddpm"], 10),
    "sd3": (DIT + ["model.pos_embed=sincos"], 10), "sd3_uncond": (DIT + ["model.pos_embed=sincos"], 0),
    "flux": (DIT + ["model.qk_norm=true", "model.class_embed=adaln"], 10),
}


def make_config(run_dir: Path, overrides: list[str], classes: int):
    return load_config(None, [f"run_dir={run_dir}", "model.in_channels=1", "model.image_size=8",
                              f"model.num_classes={classes}", *overrides])


def make_run(run_dir: Path, overrides: list[str], classes: int, seed: int = 0) -> Path:
    """A run directory with one checkpoint of a model whose weights are perturbed from their (partly zero) init."""
    cfg = make_config(run_dir, overrides, classes)
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    ema = {"rate": 0.999, "updates": 5, "weights": weights}
    (run_dir / "checkpoints").mkdir(parents=True)
    save_checkpoint({"config": cfg.to_dict(), "step": 5, "model": weights, "ema": ema, "emas": [ema], "world_size": 1,
                     "class_names": [f"c{i}" for i in range(classes)]}, run_dir / "checkpoints" / checkpoint_name(5))
    lines = [{"step": 5, "loss": 0.25, "grad_norm": 1.5}, {"step": 5, "val_loss": 0.375}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return run_dir


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """(run, exported folder) of each kind."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for name, (overrides, classes) in KINDS.items():
        run = make_run(root / name, overrides, classes)
        if name == "unet":
            (run / "eval.json").write_text(json.dumps({"classifier_accuracy": 0.875, "samples": "x"}))
        report = export_run(run, root / f"{name}-out")
        assert report.max_abs_diff < 1e-5
        out[name] = (run, report.out)
    return out


@pytest.mark.parametrize("name", list(KINDS))
def test_exported_model_loads_and_matches(exported, name):
    """from_pretrained(local_files_only) gives outputs equal to difftrain's, conditional and null class."""
    run, out = exported[name]
    cfg, model, _ = load_for_export(run)
    conv = convert_model(model, cfg)
    cls = getattr(diffusers, conv.class_name)
    loaded = cls.from_pretrained(out / conv.subfolder, local_files_only=True).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 8, 8, generator=g)
    t = torch.tensor([3, 500, 999]) if cfg.diffusion.process == "ddpm" else torch.tensor([12.5, 500.0, 990.0])
    k = cfg.model.num_classes
    for y in ([torch.tensor([0, 7, k]), None] if k else [None]):
        with torch.no_grad():
            theirs, ours = call_diffusers(loaded, conv, cfg, x, t, y), model(x, t, y)
        assert ours.abs().max() > 0.1  # a real signal, not the zero-initialised output
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_unet_variants_match(tmp_path):
    """More UNet options: fixed head width, one head, attention at every level, no attention."""
    for extra in (["model.num_head_channels=8", "model.attention_resolutions=[1,2]"], ["model.num_heads=1"],
                  ["model.attention_resolutions=[]", "model.resblock_updown=true"]):
        cfg = make_config(tmp_path, UNET + extra, 3)
        model = build_model(cfg.model)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        conv = convert_model(model, cfg)
        x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([10, 900]), torch.tensor([1, 3])
        with torch.no_grad():
            diff = (call_diffusers(build_diffusers_model(conv), conv, cfg, x, t, y) - model(x, t, y)).abs().max()
        assert diff < 1e-5, extra


def _guided_loop(model_fn, scheduler, x, labels, null, scale, **step):
    for t in scheduler.timesteps:
        with torch.no_grad():
            cond, uncond = model_fn(torch.cat([x, x]), t, torch.cat([labels, torch.full_like(labels, null)])).chunk(2)
        x = scheduler.step(uncond + scale * (cond - uncond), t, x, **step).prev_sample
    return x


def test_ddim_loop_matches_generate(exported):
    """diffusers' DDIMScheduler from the export, guided, from the same noise: the images of `generate`."""
    run, out = exported["unet"]
    cfg, model, _ = load_for_export(run)
    labels, n = torch.tensor([0, 3, 5, 9]), 4
    ours = generate(model, cfg, n, labels=labels, seed=3, guidance=2.0)  # the run's sampler: ddim, 10 trailing steps
    unet = UNet2DModel.from_pretrained(out / "unet", local_files_only=True).eval()
    scheduler = DDIMScheduler.from_pretrained(out, subfolder="scheduler", local_files_only=True)
    scheduler.set_timesteps(cfg.sample.steps)
    x = PerSampleNoise(3, range(n)).randn_like(torch.empty(n, 1, 8, 8))
    x = _guided_loop(lambda x, t, y: unet(x, t, class_labels=y).sample, scheduler, x, labels, 10, 2.0,
                     use_clipped_model_output=True)
    diff = (to_uint8(x).int() - ours.int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 0.05


def test_flow_loop_matches_generate(exported):
    """FlowMatchEulerDiscreteScheduler + the exported SD3 transformer: the images of `generate` (euler)."""
    run, out = exported["sd3"]
    cfg, model, _ = load_for_export(run)
    conv = convert_model(model, cfg)
    labels, n = torch.tensor([1, 2, 8]), 3
    ours = generate(model, cfg, n, labels=labels, seed=5, guidance=1.5)
    loaded = diffusers.SD3Transformer2DModel.from_pretrained(out / "transformer", local_files_only=True).eval()
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(out, subfolder="scheduler", local_files_only=True)
    scheduler.set_timesteps(cfg.sample.steps)
    x = PerSampleNoise(5, range(n)).randn_like(torch.empty(n, 1, 8, 8))
    x = _guided_loop(lambda x, t, y: call_diffusers(loaded, conv, cfg, x, t.expand(len(x)), y), scheduler, x, labels,
                     10, 1.5)
    diff = (to_uint8(x).int() - ours.int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 0.05


def test_folder_and_card_work_without_difftrain(exported):
    """In a process that never imports difftrain: DDPMPipeline.from_pretrained on the unconditional export, and the
    sampling code of every model card."""
    out = exported["unet_uncond"][1]
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    snippets = []
    for name in KINDS:
        card = (exported[name][1] / "README.md").read_text()
        code = card.split("```python\n", 1)[1].split("```", 1)[0]
        snippets.append(code.replace(", num_inference_steps=10", ", num_inference_steps=3"))
    script = f"""
import sys, torch
from diffusers import DDPMPipeline
pipe = DDPMPipeline.from_pretrained({str(out)!r}, local_files_only=True)
images = pipe(batch_size=2, num_inference_steps=4, output_type="np").images
assert images.shape == (2, 8, 8, 1), images.shape
for code in {snippets!r}:
    scope = {{}}
    exec(code, scope)
    result = scope["images"]
    if not isinstance(result, list):  # a tensor in [0, 1]; the pipeline's card gives PIL images
        assert torch.isfinite(result).all() and 0 <= result.min() and result.max() <= 1
assert not [m for m in sys.modules if m.startswith("difftrain")], "difftrain was imported"
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_model_card_and_sidecar(exported):
    run, out = exported["unet"]
    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "diffusers" and "difftrain" in meta["tags"] and meta["datasets"] == ["digits"]
    assert meta["resolution"] == 8 and meta["classes"] == [f"c{i}" for i in range(10)]
    assert "| loss | 0.25 | 5 |" in card and "| val\\_loss | 0.375 | 5 |" in card  # _ escaped: literal Markdown
    assert "| classifier\\_accuracy | 0.875 | eval.json |" in card and "- images seen: 640" in card
    assert "model_channels: 16" in card  # the resolved training config
    side = json.loads((out / "difftrain.json").read_text())
    assert side["null_class"] == 10 and side["class_input"] == "class_labels" and side["step"] == 5
    assert {p.name for p in out.iterdir()} == {"unet", "scheduler", "README.md", "difftrain.json"}


def test_scheduler_config_is_the_run_schedule(tmp_path):
    """Named diffusers schedules equal ours (float32), the prediction types map, clip and spacing carry over."""
    for schedule, pred, name in (("linear", "eps", "epsilon"), ("sqrt_linear", "v", "v_prediction"),
                                 ("cosine", "x0", "sample")):
        cfg = make_config(tmp_path, [f"diffusion.schedule={schedule}", f"diffusion.prediction={pred}",
                                     "diffusion.beta_start=0.00085", "diffusion.beta_end=0.012"], 0)
        cls, kw = scheduler_config(cfg)
        sched = getattr(diffusers, cls)(**kw)
        assert cls == "DDIMScheduler" and kw["prediction_type"] == name and kw["clip_sample"] is True
        assert kw["timestep_spacing"] == cfg.sample.spacing
        ours = make_betas(schedule, 1000, 0.00085, 0.012).float()
        torch.testing.assert_close(sched.betas, ours, rtol=1e-5, atol=1e-9)
    flow = make_config(tmp_path, DIT + ["diffusion.shift=3.0"], 0)
    cls, kw = scheduler_config(flow)
    sched = getattr(diffusers, cls)(**kw)
    sched.set_timesteps(7)
    assert cls == "FlowMatchEulerDiscreteScheduler"
    assert sched.sigmas.tolist() == pytest.approx(flow_sigmas(7, 3.0, 1000), abs=1e-6)
    cls, kw = scheduler_config(make_config(tmp_path, UNET + ["diffusion.learn_sigma=true"], 0))
    assert cls == "DDPMScheduler" and kw["variance_type"] == "learned_range"  # only DDPM reads the 2C output


def test_init_from_diffusers_unet_gives_its_loss(tmp_path):
    """A UNet2DModel saved with save_pretrained starts a difftrain model whose loss is the diffusers model's."""
    cfg = make_config(tmp_path / "run", UNET, 10)
    config = unet2d_config(build_model(cfg.model), cfg.model)
    torch.manual_seed(7)
    unet = UNet2DModel(**config).eval()  # diffusers' own random initialisation
    unet.save_pretrained(tmp_path / "pretrained", safe_serialization=True)
    cfg.model.init_from = str(tmp_path / "pretrained")
    model = build_model(cfg.model).eval()
    init_weights(model, cfg.model.init_from, cfg)

    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(6, 1, 8, 8, generator=g) * 2 - 1, torch.randn(6, 1, 8, 8, generator=g)
    t, y = torch.tensor([0, 10, 250, 500, 750, 999]), torch.tensor([0, 1, 2, 3, 9, 10])
    with torch.no_grad():
        ours = build_process(cfg.diffusion).loss(lambda x, tt: model(x, tt, y), x0, t, noise)
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
        x_t = scheduler.add_noise(x0, noise, t)
        theirs = (unet(x_t, t, class_labels=y).sample - noise).pow(2).flatten(1).mean(1)
    assert ours.min() > 0.1
    torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=1e-5)


def test_init_from_starts_training(tmp_path):
    """`train` with model.init_from = a diffusers folder: the run's weights are the diffusers model's
    (lr 1e-12: the one step moves them by ~1e-12)."""
    from difftrain.training import train

    cfg = make_config(tmp_path / "run", UNET, 10)
    unet = UNet2DModel(**unet2d_config(build_model(cfg.model), cfg.model))
    unet.save_pretrained(tmp_path / "pretrained", safe_serialization=True)
    expected = build_model(cfg.model)
    init_weights(expected, str(tmp_path / "pretrained"), cfg)
    cfg = make_config(tmp_path / "run", UNET + [f"model.init_from={tmp_path / 'pretrained'}", "train.steps=1",
                                                "train.lr=1e-12", "train.batch_size=8", "train.progress=false",
                                                "train.tensorboard=false", "sample.steps=2"], 10)
    train(cfg)
    from safetensors.torch import load_file

    got = load_file(tmp_path / "run" / "weights.safetensors")
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-8)
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["loss"] > 0.1  # diffusers' initialisation predicts noise badly, unlike our zero-initialised output


def test_init_from_our_run_checkpoint_and_safetensors(exported, tmp_path):
    run, out = exported["unet"]
    cfg, model, _ = load_for_export(run)
    from safetensors.torch import save_file

    save_file(model.state_dict(), tmp_path / "w.safetensors")
    for source in (run, run / "checkpoints" / checkpoint_name(5), tmp_path / "w.safetensors", out, out / "unet"):
        fresh = build_model(cfg.model)
        init_weights(fresh, str(source), cfg)
        for key, value in model.state_dict().items():
            torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_init_from_exported_dit(exported, name):
    run, out = exported[name]
    cfg, model, _ = load_for_export(run)
    fresh = build_model(cfg.model)
    init_weights(fresh, str(out), cfg)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=1e-6)


def test_init_from_mismatch_names_the_option(exported, tmp_path):
    run, out = exported["unet"]
    cfg = make_config(tmp_path, UNET + ["model.num_head_channels=16"], 10)
    with pytest.raises(ConfigError, match="attention_head_dim=8 .* model.num_heads / model.num_head_channels"):
        init_weights(build_model(cfg.model), str(out), cfg)
    cfg = make_config(tmp_path, UNET + ["model.model_channels=32"], 10)
    with pytest.raises(ConfigError, match="block_out_channels"):
        init_weights(build_model(cfg.model), str(out), cfg)
    with pytest.raises(ConfigError, match="does not exist"):
        init_weights(build_model(cfg.model), str(tmp_path / "missing"), cfg)
    cfg = make_config(tmp_path, DIT + ["model.pos_embed=sincos", "model.depth=3"], 10)
    with pytest.raises(ConfigError, match="model.depth"):
        init_weights(build_model(cfg.model), str(exported["sd3"][1]), cfg)


@pytest.mark.parametrize("overrides,option", [
    (["model.name=ddpm_unet", "model.channel_mult=[1,2]"], "model.name=ddpm_unet"),
    (UNET[:1] + ["model.channel_mult=[2,2]", "model.norm_groups=8"], "model.channel_mult"),
    (UNET[:2], "model.norm_groups=32"),
    (UNET + ["model.attention_resolutions=[1,2]"], "model.num_heads=4"),
    (DIT, "model.qk_norm=false"),
    (DIT + ["model.pos_embed=sincos", "model.mlp_ratio=2.0"], "model.mlp_ratio=2.0"),
])
def test_unsupported_configuration_names_the_option(tmp_path, overrides, option):
    run = make_run(tmp_path / "run", overrides, 10)
    with pytest.raises(ConfigError, match=option.replace("[", r"\[")):
        export_run(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_export_error_exits_2(tmp_path):
    from tests.conftest import run_cli

    run = make_run(tmp_path / "rope", DIT, 10)
    proc = run_cli("export", str(run), str(tmp_path / "out"), check=False)
    assert proc.returncode == 2 and "difftrain: error: model.pos_embed=rope with model.qk_norm=false" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_export_keeps_an_existing_folder(exported):
    run, existing = exported["unet"]
    before = {p.relative_to(existing).as_posix(): p.read_bytes() for p in existing.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match="exists and is not empty"):
        export_run(run, existing)
    assert {p.relative_to(existing).as_posix(): p.read_bytes() for p in existing.rglob("*") if p.is_file()} == before


def test_missing_diffusers_says_how_to_install(exported, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    with pytest.raises(ConfigError, match=r"pip install 'difftrain\[diffusers\]'"):
        export_run(exported["unet"][0], tmp_path / "out")


def test_zero_terminal_snr_exports_rescaled_scheduler_or_names_the_sampler():
    """diffusers rescales with rescale_betas_zero_snr; Heun cannot, and the export says which option blocks it."""
    from difftrain.config import ConfigError, load_config
    from difftrain.interop.schedulers import scheduler_config

    cfg = load_config("digits", ["diffusion.zero_terminal_snr=true", "diffusion.prediction=v", "sample.sampler=ddim"])
    name, out = scheduler_config(cfg)
    assert name == "DDIMScheduler" and out["rescale_betas_zero_snr"] is True
    cfg.sample.sampler = "heun"
    with pytest.raises(ConfigError, match="zero_terminal_snr"):
        scheduler_config(cfg)


# --- issue #24: the output folder, a full disk, the model card's text ----------------------------------------

def test_export_on_a_full_disk_leaves_nothing_and_exits_2(exported, tmp_path, monkeypatch, capsys):
    """The model and scheduler are written, then README.md fills the disk: no folder, no temporary folder."""
    from difftrain.cli import main
    from tests.test_disk_full_outputs import disk_full_after

    run = exported["unet"][0]
    out = tmp_path / "out"
    out.mkdir()  # an empty folder is a valid OUT, and stays as it was
    opened = disk_full_after(monkeypatch, 0, tmp_path, only="README.md")
    assert main(["export", str(run), str(out)]) == 2
    err = capsys.readouterr().err
    assert f"difftrain: error: cannot write export '{out}': No space left on device" in err, err
    assert "README.md" in opened and "config.json" in opened  # the disk filled part-way
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "out"]
    assert not any(out.iterdir())


def test_export_refuses_a_symlink_out(exported, tmp_path):
    run = exported["unet"][0]
    real = tmp_path / "real"
    real.mkdir()
    for target in (real, tmp_path / "missing"):
        link = tmp_path / f"link-to-{target.name}"
        link.symlink_to(target)
        with pytest.raises(ConfigError, match=f"'{link}' is a symbolic link \\(to '{target}'\\)"):
            export_run(run, link)
        assert link.is_symlink() and not any(real.iterdir()) and not (tmp_path / "missing").exists()


def test_a_second_export_to_the_same_folder_stops_with_a_clear_error(exported, tmp_path):
    """While one export holds .OUT.lock, another one to OUT is refused (the lock is fcntl.flock: per open file,
    so a second open in this process conflicts as another process would); once it is released the export runs."""
    from difftrain.interop.diffusers_export import ExportLock

    run, out = exported["unet"][0], tmp_path / "out"
    with ExportLock(out):
        with pytest.raises(ConfigError, match=f"another export is writing '{out}' \\(pid {os.getpid()}, lock"):
            export_run(run, out)
        assert not out.exists()
    assert export_run(run, out).out == out and (out / "README.md").is_file()


def test_model_card_escapes_markdown_html_and_front_matter(tmp_path):
    from difftrain.interop.exported import ExportReport
    from difftrain.interop.model_card import model_card

    run = make_run(tmp_path / "run", UNET, 2)
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 5, "evil|<img src=x onerror=alert(1)>": 1.0}) + "\n")
    cfg, model, facts = load_for_export(run)
    cfg.description = "digits <script>alert(1)</script> **bold** [link](javascript:x)\n# not a heading\n```\n<b>"
    names = ["a\n---\nlibrary_name: evil", "it's \"quoted\": yes"]
    exported = convert_model(model, cfg)
    report = ExportReport(tmp_path / "o", exported.class_name, "DDIMScheduler", None, 0.0, 5, {**facts, "class_names": names})
    card = model_card(cfg, exported, report)
    prose, config_block = card.split("<details>")  # the config block is code: its text is shown as it is
    assert "<script>" not in prose and "<img" not in prose and "<b>" not in prose
    assert "Recipe: digits &lt;script&gt;alert(1)&lt;/script&gt; \\*\\*bold\\*\\* \\[link\\](javascript:x) \\# not" in card
    assert "| evil\\|&lt;img src=x onerror=alert(1)&gt; | 1 | 5 |" in card  # one cell: the pipe escaped
    head = card.split("---\n", 1)[1].split("\n---\n", 1)[0]
    meta = yaml.safe_load(head)
    assert meta["classes"] == names and meta["library_name"] == "diffusers"
    assert "\n````yaml\n" in config_block and config_block.count("\n````") == 2  # outlasts the ``` inside


def test_model_card_metrics_skip_damaged_lines(tmp_path):
    """The model card's metrics come from the report's tolerant reader: a line nested 100k deep, a byte that is
    not UTF-8, NaN and a cut line are skipped; the last finite value of each key is kept."""
    from difftrain.interop.model_card import read_metrics

    lines = [b'{"step": 1, "loss": 0.5}', b"[" * 100_000 + b"]" * 100_000, b'{"step": 2, "loss": 0.25, "x": \xff}',
             b'{"step": 3, "loss": NaN, "lr": 0.001}', b'{"step": 4, "lo']
    (tmp_path / "metrics.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    metrics = read_metrics(tmp_path)
    assert metrics["loss"] == (1, 0.5) and metrics["lr"] == (3, 0.001)
