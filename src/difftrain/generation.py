"""Sampling from trained models, and writing samples as a grid, a PNG folder or a .npz.

Used by the training loop (sample grids) and by `difftrain sample RUN_DIR`. A run is
rebuilt from its checkpoint alone: the checkpoint carries the resolved config.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from difftrain.checkpoint import (
    atomic_write,
    load_model_state,
    load_weights_file,
    read_run_checkpoint,
    select_weights,
    weights_file,
    write_error,
)
from difftrain.config import Config, ConfigError, config_from_dict
from difftrain.data.images import to_pil, to_pil_images
from difftrain.models import build_model
from difftrain.runtime import resolve_device  # re-exported: training/ imports it from here
from difftrain.sampling import SamplingPlan

OUTPUT_FORMATS = ("grid", "npz", "png-dir")


@dataclass
class LoadedRun:
    cfg: Config
    model: nn.Module
    step: int
    class_names: list[str]
    source: Path
    run_dir: Path | None = None  # the run directory it came from (a checkpoint's RUN of RUN/checkpoints/step-N.pt)

    def plan(self, **overrides) -> SamplingPlan:
        """The run's sampling plan on its model's device; `overrides` as `SamplingPlan.from_config` takes them."""
        return SamplingPlan.from_config(self.cfg, device=next(self.model.parameters()).device, **overrides)


def load_run(path: str | Path, *, weights: str = "ema", device: str | torch.device = "cpu",
             like: Config | None = None) -> LoadedRun:
    """Model and config from a run directory (its newest valid checkpoint) or a checkpoint file.

    `weights` is "ema" (the first EMA rate, the default for sampling), "raw", an EMA rate ("0.9999"), a post-hoc
    EMA written by `difftrain ema` ("phema-0.1": RUN/weights-phema-0.1.safetensors) or a .safetensors file.
    `like`: the config of the run this one guides; another model or diffusion section is refused, naming each
    difference, before any weights are loaded.
    """
    path = Path(path)
    source, state = read_run_checkpoint(path)
    cfg = config_from_dict(state["config"])
    if like is not None:
        _refuse_another_family(cfg, like, source)
    if cfg.autoencoder.kind != "none":
        raise ConfigError(f"'{path}' is an autoencoder run (autoencoder.kind={cfg.autoencoder.kind}): it reconstructs, "
                          f"it does not sample; name it as latent.first_stage of a latent diffusion recipe")
    model = build_model(cfg.model)
    step, file = int(state["step"]), weights_file(path if path.is_dir() else _run_dir_of(path), weights)
    if file is not None:  # post-hoc EMA (phema-SIGMA) or a safetensors file: the checkpoint gives the config
        tensors, meta = load_weights_file(file)
        source, step = file, int(meta["step"]) if meta.get("step", "").isdigit() else step
    else:
        tensors = select_weights(state, weights, str(source))
    load_model_state(model, tensors, str(source))
    model.to(resolve_device(str(device)) if isinstance(device, str) else device).eval()
    run_dir = path if path.is_dir() else _run_dir_of(path)
    return LoadedRun(cfg, model, step, list(state.get("class_names", [])), source, run_dir)


GUIDE_WEIGHTS = "ema-RATE (an EMA rate of train.ema_rates), ema, raw, phema-SIGMA, a checkpoint .pt or a .safetensors"


def load_guide(run: LoadedRun, weights: str) -> LoadedRun:
    """The guide of autoguidance (`sample.guide=auto`), on the device of `run`'s model: `weights` names other weights
    of the run (`GUIDE_WEIGHTS`: "ema-0.9" is the EMA of rate 0.9, so is "0.9"), a step's checkpoint .pt (its raw
    weights; a relative path is read from the working directory, else from the run directory) or a .safetensors
    file. The guide must have the run's architecture and process (model and diffusion sections), else a
    ConfigError naming each difference."""
    if not weights:
        raise ConfigError(f"sample.guide=auto needs the guide's weights: --guide-weights {GUIDE_WEIGHTS}")
    device = next(run.model.parameters()).device
    name, run_dir = weights.removeprefix("ema-") if weights.startswith("ema-") else weights, run.run_dir or Path(".")
    if name.endswith((".pt", ".safetensors")) and not Path(name).is_absolute() and not Path(name).exists():
        name = str(run_dir / name)
    if name.endswith(".pt"):
        return load_run(name, weights="raw", device=device, like=run.cfg)
    return load_run(run.source if run.source.suffix == ".pt" else run_dir, weights=name, device=device, like=run.cfg)


# What a guide shares with the run it guides: the network (all model keys but those of training only) and the D(x; sigma)
# its output stands for (the process keys sampling reads), so the two outputs mix as two denoisers (samplers/guidance).
TRAINING_ONLY_MODEL_KEYS = ("init_from", "weight_init", "dropout")
DENOISER_KEYS = ("process", "timesteps", "schedule", "beta_start", "beta_end", "prediction", "zero_terminal_snr",
                 "learn_sigma", "shift", "sigma_data")


def _refuse_another_family(cfg: Config, like: Config, source: Path) -> None:
    """A ConfigError naming each model / D(x; sigma) key where `cfg` (a guide's) differs from `like` (the run's)."""
    ours, theirs = asdict(cfg.model), asdict(like.model)
    changed = [f"model.{key}: guide {_show(value)} vs run {_show(theirs[key])}" for key, value in ours.items()
               if key not in TRAINING_ONLY_MODEL_KEYS and value != theirs[key]]
    changed += [f"diffusion.{key}: guide {_show(getattr(cfg.diffusion, key))} vs run "
                f"{_show(getattr(like.diffusion, key))}" for key in DENOISER_KEYS
                if getattr(cfg.diffusion, key) != getattr(like.diffusion, key)]
    if changed:
        raise ConfigError(f"the guide '{source}' has another architecture or process than the run; autoguidance "
                          "mixes two models of the same family:\n  " + "\n  ".join(changed))


def _show(value) -> str:
    return "null" if value is None else str(value)


def _run_dir_of(checkpoint: Path) -> Path:
    """The run directory of RUN/checkpoints/step-NNNNNNN.pt (or the checkpoint's folder)."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def cycled_labels(n: int, num_classes: int, classes: list[int] | None = None) -> Tensor | None:
    """Labels for n samples cycling through `classes` (all classes by default); None if unconditional."""
    if not num_classes:
        return None
    classes = classes if classes is not None else list(range(num_classes))
    return torch.tensor([classes[i % len(classes)] for i in range(n)], dtype=torch.long)


def generate(model: nn.Module, cfg: Config, n: int, *, labels: Tensor | None = None, seed: int = 0,
             sampler: str | None = None, steps: int | None = None, guidance: float | None = None,
             eta: float | None = None, batch_size: int | None = None, progress: bool = False,
             trajectory: list[Tensor] | None = None) -> Tensor:
    """n samples as uint8 (n, C, H, W); sample i depends only on (seed, i, label i), not on batching.

    The one-call form of `SamplingPlan.from_config(cfg, ...).sample(model, n, ...)` (difftrain.sampling), on the
    model's device: other sampling options (spacing, respacing, variance, guidance interval, clipping) come from
    `cfg.sample`. `trajectory`: a list that receives the model's input x_t (n, C, H, W, uint8) at every model
    call, the denoising trajectory, then the samples themselves. Sampling many times: build the plan once.
    """
    plan = SamplingPlan.from_config(cfg, device=next(model.parameters()).device, sampler=sampler, steps=steps,
                                    guidance=guidance, eta=eta, batch_size=batch_size)
    return plan.sample(model, n, labels=labels, seed=seed, progress=progress, trajectory=trajectory)


# --- writing samples ------------------------------------------------------------------

def grid_order(labels: Tensor | None, n: int) -> tuple[Tensor, int]:
    """An order that puts one class per row, and the row length, when n splits evenly by class."""
    if labels is None:
        return torch.arange(n), max(1, int(math.ceil(math.sqrt(n))))
    counts = torch.bincount(labels)
    present = counts[counts > 0]
    if bool((present == present[0]).all()):  # one sample per class: a single row
        return torch.argsort(labels, stable=True), int(present[0]) if present[0] > 1 else len(present)
    return torch.arange(n), max(1, int(math.ceil(math.sqrt(n))))


def write_grid(images: Tensor, labels: Tensor | None, path: Path, *, scale: int | None = None) -> Path:
    """A PNG grid (one class per row when possible); small images are upscaled to be legible."""
    from torchvision.utils import make_grid

    order, nrow = grid_order(labels, len(images))
    grid = make_grid(images[order], nrow=nrow, padding=1, pad_value=128)  # (C, H, W) uint8
    img = to_pil(grid, scale or max(1, 32 // images.shape[-1]))  # small images upscaled
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: img.save(f, format="PNG"))
    return path


def write_npz(images: Tensor, labels: Tensor | None, path: Path) -> Path:
    """guided-diffusion's layout: arr_0 uint8 (N, H, W, C), arr_1 int64 labels when conditional."""
    arrays = [images.permute(0, 2, 3, 1).numpy()]
    if labels is not None:
        arrays.append(labels.numpy().astype(np.int64))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: np.savez(f, *arrays))
    return path


def write_png_dir(images: Tensor, labels: Tensor | None, folder: Path, class_names: list[str] | None = None) -> Path:
    """One PNG per sample named CLASS_NNNNNN.png, readable back as an image folder (class from prefix).

    The PNGs go to a temporary folder beside `folder` and are renamed into it only once all of them are written:
    a failure (a full disk) removes them, raises `cannot write samples 'FILE': CAUSE`, and leaves `folder` as it was."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"'{folder}' is a file; png-dir output is a folder of PNGs (give another --out)")
    if labels is None:
        names = [f"{i:06d}.png" for i in range(len(images))]
    else:
        names = [f"{class_names[int(y)] if class_names else int(y)}_{i:06d}.png" for i, y in enumerate(labels)]
    absolute = Path(os.path.abspath(folder))
    tmp = absolute.with_name(f".{absolute.name}.tmp-{os.getpid()}")
    file = folder
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, img in zip(names, to_pil_images(images)):
            file = folder / name
            img.save(tmp / name, format="PNG")
        if not folder.exists():
            file = folder
            os.rename(tmp, folder)
        else:  # renames only: they need no space, and files of other names in the folder stay
            for name in names:
                file = folder / name
                os.replace(tmp / name, folder / name)
            tmp.rmdir()
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, (OSError, RuntimeError)):
            raise
        raise write_error("samples", file, e) from None
    return folder


TRAJECTORY_FORMATS = ("gif", "strip")


def write_trajectory(frames: list[Tensor], labels: Tensor | None, path: Path, *, fmt: str = "gif",
                     max_frames: int = 20, duration_ms: int = 80) -> Path:
    """The denoising trajectory (from `generate(..., trajectory=frames)`): an animated GIF of grids,
    or a strip PNG with one row per sample and `max_frames` columns from noise to the sample."""
    from torchvision.utils import make_grid

    if fmt not in TRAJECTORY_FORMATS:
        raise ConfigError(f"unknown trajectory format '{fmt}'; choose from {', '.join(TRAJECTORY_FORMATS)}")
    k = min(max_frames, len(frames))
    keep = sorted({round(i * (len(frames) - 1) / max(k - 1, 1)) for i in range(k)})
    chosen = [frames[i] for i in keep]
    scale = max(1, 32 // chosen[0].shape[-1])
    path.parent.mkdir(parents=True, exist_ok=True)

    if fmt == "strip":
        tiles = torch.stack(chosen, dim=1).flatten(0, 1)  # (n * frames, C, H, W), row i = sample i over time
        img = to_pil(make_grid(tiles, nrow=len(chosen), padding=1, pad_value=128), scale)
        atomic_write(path, lambda f: img.save(f, format="PNG"))
        return path
    order, nrow = grid_order(labels, len(chosen[0]))
    pics = [to_pil(make_grid(frame[order], nrow=nrow, padding=1, pad_value=128), scale) for frame in chosen]
    pics += [pics[-1]] * 5  # hold the final samples
    atomic_write(path, lambda f: pics[0].save(f, format="GIF", save_all=True, append_images=pics[1:],
                                             duration=duration_ms, loop=0))
    return path


def write_samples(images: Tensor, labels: Tensor | None, out: Path, fmt: str, class_names: list[str] | None = None) -> Path:
    if fmt == "grid":
        return write_grid(images, labels, out)
    if fmt == "npz":
        return write_npz(images, labels, out)
    if fmt == "png-dir":
        return write_png_dir(images, labels, out, class_names)
    raise ConfigError(f"unknown format '{fmt}'; choose from {', '.join(OUTPUT_FORMATS)}")
