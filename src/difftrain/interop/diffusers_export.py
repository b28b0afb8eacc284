"""`difftrain export RUN OUT`: a trained run as a folder in diffusers' layout, with a model card.

    OUT/
      unet/ | transformer/   the denoiser, save_pretrained as safetensors: UNet2DModel (adm_unet),
                             SD3Transformer2DModel (DiT, sincos) or FluxTransformer2DModel (DiT, rope + qk_norm)
      scheduler/             the scheduler of the run's sampler with the run's schedule (interop/schedulers.py)
      model_index.json       DDPMPipeline, where a stock pipeline fits: an unconditional pixel-space DDPM UNet
      difftrain.json         what a diffusers config cannot say: null class, class names, how class and timestep enter
      README.md              model card: Hub front matter, usage code, training config, metrics

Before anything is written, the diffusers model is run against ours on a random batch; the largest
difference is reported. The folder is written beside OUT (`.OUT.tmp-PID`) and renamed into place, under
the lock `.OUT.lock`; a symbolic link OUT is refused.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import Tensor, nn

from difftrain.checkpoint import (
    images_seen,
    load_model_state,
    read_run_checkpoint,
    select_weights,
    write_error,
)
from difftrain.config import Config, ConfigError, config_from_dict
from difftrain.interop.convert import unet2d_config, unet_to_diffusers
from difftrain.interop.convert_dit import (
    class_inputs,
    dit_config,
    dit_target,
    dit_to_diffusers,
    flux_ids,
    flux_pack,
    flux_unpack,
)
from difftrain.interop.exported import Exported, ExportReport
from difftrain.interop.model_card import model_card
from difftrain.interop.schedulers import scheduler_config
from difftrain.models import build_model


def require_diffusers():
    """The diffusers module, or a clear error naming the extra that installs it."""
    try:
        import diffusers
    except ImportError:
        raise ConfigError("this needs diffusers, an optional dependency: pip install 'difftrain[diffusers]'") from None
    return diffusers


def load_for_export(path: str | Path, weights: str = "ema") -> tuple[Config, nn.Module, dict]:
    """The run's config, its model with `weights` (ema | raw | RATE), and facts for the model card."""
    path = Path(path)
    source, state = read_run_checkpoint(path)
    cfg = config_from_dict(state["config"])
    if cfg.autoencoder.kind != "none":
        raise ConfigError(f"'{path}' is an autoencoder run (autoencoder.kind={cfg.autoencoder.kind}); export writes "
                          f"diffusion models (a first stage loads in diffusers through its own classes)")
    model = build_model(cfg.model)
    load_model_state(model, select_weights(state, weights, str(source)), str(source))
    run_dir = source.parent.parent if source.parent.name == "checkpoints" else source.parent
    facts = dict(step=int(state["step"]), world_size=int(state.get("world_size", 1)), weights=weights,
                 images_seen=images_seen(state),
                 class_names=list(state.get("class_names", [])), source=str(source), run_dir=str(run_dir))
    return cfg, model.eval(), facts


def convert_model(model: nn.Module, cfg: Config) -> Exported:
    """Our model as diffusers weights and config, or a ConfigError naming the option that has no equivalent."""
    mc = cfg.model
    if mc.name.startswith("dit"):
        target = dit_target(model, mc)
        return Exported(target, dit_config(model, mc, target), dit_to_diffusers(model, mc, target), model.patch_size)
    config = unet2d_config(model, mc)
    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    return Exported("unet", config, unet_to_diffusers(state, mc))


def build_diffusers_model(exported: Exported) -> nn.Module:
    diffusers = require_diffusers()
    cls = getattr(diffusers, exported.class_name, None)
    if cls is None:
        raise ConfigError(f"diffusers {diffusers.__version__} has no {exported.class_name}; upgrade it "
                          f"(pip install -U 'difftrain[diffusers]')")
    model = cls(**exported.config)
    model.load_state_dict(exported.state, strict=True)
    return model.eval()


def call_diffusers(dmodel: nn.Module, exported: Exported, cfg: Config, x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
    """The diffusers model called as difftrain calls ours, `model(x, t, y)`: y None is the null class."""
    mc = cfg.model
    k = mc.num_classes or 0
    if exported.target == "unet":
        labels = (torch.full((x.shape[0],), k) if y is None else y) if k else None
        return dmodel(x, t, class_labels=labels).sample
    kw = class_inputs(y, k, mc.class_embed, x.shape[0])
    if exported.target == "sd3":
        return dmodel(x, timestep=t, **kw).sample
    p = exported.patch_size
    img_ids, txt_ids = flux_ids(x.shape[-1] // p, kw["encoder_hidden_states"].shape[1])
    out = dmodel(flux_pack(x, p), timestep=t / 1000, img_ids=img_ids, txt_ids=txt_ids, **kw).sample
    return flux_unpack(out, p, x.shape[-1])


@torch.no_grad()
def max_difference(model: nn.Module, dmodel: nn.Module, exported: Exported, cfg: Config, seed: int = 0) -> float:
    """max |diffusers(x, t, y) - ours(x, t, y)| on a seeded random batch (a conditional and a null label)."""
    g = torch.Generator().manual_seed(seed)
    mc = cfg.model
    x = torch.randn(2, mc.in_channels, mc.image_size, mc.image_size, generator=g)
    t = torch.tensor([0.1, 0.7]) * cfg.diffusion.timesteps
    t = t.round().long() if cfg.diffusion.process == "ddpm" else t
    y = torch.tensor([0, mc.num_classes]) if mc.num_classes else None
    return float((call_diffusers(dmodel, exported, cfg, x, t, y) - model(x, t, y)).abs().max())


def stock_pipeline(cfg: Config, exported: Exported) -> str | None:
    """DDPMPipeline for an unconditional pixel-space DDPM UNet with data in [-1, 1]; None where no stock pipeline fits."""
    plain = cfg.data.normalize == "none" and not cfg.latent.first_stage
    if exported.target == "unet" and not cfg.model.num_classes and cfg.diffusion.process == "ddpm" and plain:
        return "DDPMPipeline"
    return None


def export_run(run: str | Path, out: str | Path, *, weights: str = "ema") -> ExportReport:
    """Write the run's denoiser, scheduler, model card (and model_index.json where a pipeline fits) to `out`.

    `out` must not exist or be an empty folder, and must not be a symbolic link. The folder is written as
    `.OUT.tmp-PID` beside it and renamed into place at the end, under the lock `.OUT.lock` (fcntl.flock), so a
    failed export (a full disk) leaves nothing and a second export to the same folder stops with a clear error."""
    out = Path(out)
    _check_out(out)
    diffusers = require_diffusers()
    cfg, model, facts = load_for_export(run, weights)
    exported = convert_model(model, cfg)
    dmodel = build_diffusers_model(exported)
    diff = max_difference(model, dmodel, exported, cfg)
    sched_name, sched_cfg = scheduler_config(cfg)
    scheduler = getattr(diffusers, sched_name)(**sched_cfg)
    pipeline = stock_pipeline(cfg, exported)
    report = ExportReport(out, exported.class_name, sched_name, pipeline, diff, facts["step"], facts)
    absolute = Path(os.path.abspath(out))
    tmp = absolute.with_name(f".{absolute.name}.tmp-{os.getpid()}")
    with ExportLock(absolute):
        _check_out(out)  # again, now that no other export can be writing it
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _write_folder(tmp, dmodel, scheduler, exported, cfg, report, diffusers)
            os.rename(tmp, out)  # replaces an empty folder (rename(2)); fails on one filled meanwhile
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if not isinstance(e, (OSError, RuntimeError, SafetensorError)):
                raise
            failed = getattr(e, "filename", None)
            where = out / Path(failed).relative_to(tmp) if failed and Path(failed).is_relative_to(tmp) else out
            raise write_error("export", where, e) from None
    return report


def _check_out(out: Path) -> None:
    if out.is_symlink():
        raise ConfigError(f"'{out}' is a symbolic link (to '{os.readlink(out)}'); export writes a new folder and "
                          f"does not follow links: give the real path or another one")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"'{out}' is a file; export writes a new folder")
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"'{out}' exists and is not empty; export writes a new folder")


class ExportLock:
    """An exclusive fcntl.flock on `.OUT.lock` beside OUT while an export writes OUT. The OS drops it when the
    process ends (kill -9 too); the file stays, naming the last holder."""

    def __init__(self, out: Path):
        self.out, self.path = out, out.with_name(f".{out.name}.lock")
        self.fd: int | None = None

    def __enter__(self) -> ExportLock:
        import fcntl

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise write_error("the export lock", self.path, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 256).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(f"another export is writing '{self.out}' "
                              f"(pid {holder}, lock '{self.path}'); wait for it to end or export elsewhere") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)  # closing releases the flock
        self.fd = None


def _write_folder(folder: Path, dmodel, scheduler, exported: Exported, cfg: Config, report: ExportReport, diffusers) -> None:
    folder.mkdir(parents=True)
    if report.pipeline:
        getattr(diffusers, report.pipeline)(unet=dmodel, scheduler=scheduler).save_pretrained(folder, safe_serialization=True)
    else:
        dmodel.save_pretrained(folder / exported.subfolder, safe_serialization=True)
        scheduler.save_pretrained(folder / "scheduler")
    (folder / "difftrain.json").write_text(json.dumps(sidecar(cfg, exported, report), indent=2) + "\n")
    (folder / "README.md").write_text(model_card(cfg, exported, report))


def sidecar(cfg: Config, exported: Exported, report: ExportReport) -> dict:
    """difftrain.json: how to call the exported model, and what its outputs mean."""
    mc, k = cfg.model, cfg.model.num_classes or 0
    class_input = {"unet": "class_labels"}.get(exported.target) or (
        "encoder_hidden_states = one_hot(y, num_classes + 1)[:, None]" if mc.class_embed == "token"
        else "pooled_projections = one_hot(y, num_classes + 1)")
    return {
        "format": "difftrain-export", "version": 1, "model": exported.class_name, "subfolder": exported.subfolder,
        "scheduler": report.scheduler, "process": cfg.diffusion.process, "prediction": cfg.diffusion.prediction,
        "timestep": "t / 1000 (FLUX multiplies it by 1000)" if exported.target == "flux" else "t",
        "timesteps": cfg.diffusion.timesteps, "num_classes": k, "null_class": k if k else None,
        "class_names": report.facts["class_names"], "class_input": class_input if k else None,
        "patch_size": exported.patch_size if exported.target == "flux" else None,
        "data": {"normalize": cfg.data.normalize, "mean": cfg.data.mean, "std": cfg.data.std},
        "latent": {"first_stage": cfg.latent.first_stage, "scale_factor": cfg.latent.scale_factor},
        "step": report.step, "weights": report.facts["weights"], "max_abs_diff": report.max_abs_diff,
    }
