"""One sampling plan, built once from a run: process, sampler and its sigmas, guidance, decoder and data range.

`SamplingPlan.from_config(cfg, ...)` reads the run's config sections once (diffusion, sample, model shape and
classes, latent, data): it builds the process, refuses a sampler that does not apply to it, computes the sigmas
and the sampler's options, checks the guidance interval and loads the latent decoder. `plan.sample(model, n,
labels=..., seed=...)` then draws uint8 images from any `model(x, t, y=None)` with the run's interface (the run's
network, an EMA, a student; autoguidance takes a second model, the guide): sample i depends only on
(seed, i, label i), not on the batching.
`SamplingPlan.build(process, shape, ...)` makes a plan without a run config. `generation.generate` is the
one-call wrapper of both steps.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor
from tqdm import tqdm

from difftrain.config import Config, ConfigError
from difftrain.config_checks import check_value, interval_clash
from difftrain.data.memory import to_uint8
from difftrain.latent import decoder_for
from difftrain.processes import Process, build_process
from difftrain.samplers import PerSampleNoise, SamplerSpec, guided_denoiser, run_sampler, sampler_spec

ModelFn = Callable[..., Tensor]  # model(x, t, y=None) -> Tensor


@dataclass(frozen=True)
class Guidance:
    """Guidance of a plan where lo < sigma <= hi (`samplers.guidance`): classifier-free, D = D_u + scale (D_c - D_u),
    or autoguidance by a guide model (Karras et al. 2024, eq. 2), D = D_g + scale (D_c - D_g)."""

    scale: float = 1.0  # 1: the plain conditional model, 0: the unconditional one (cfg) or the guide (auto)
    null_label: int | None = None  # the null class (the model's num_classes); None: an unconditional model
    interval: tuple[float, float] | None = None  # in sigma, lo < sigma <= hi; None: every sigma
    interval_t: tuple[float, float] | None = None  # the older form (sample.guidance_interval), t / T in [lo, hi]
    guided_channels: int | None = None  # a learned-variance model guides its first C channels only
    guide: str = "cfg"  # cfg | auto (`SamplingPlan.sample(..., guide=MODEL)`) | none: the conditional model alone


def identity(x: Tensor) -> Tensor:
    return x


@dataclass(frozen=True)
class SamplingPlan:
    """What sampling a model needs, computed once; `sample` draws images with it."""

    process: Process
    spec: SamplerSpec
    sigmas: tuple[float, ...]  # the grid the sampler walks, descending to 0
    shape: tuple[int, int, int]  # (C, H, W) of the sampler's state (latents for latent diffusion)
    guidance: Guidance = Guidance()
    options: dict = field(default_factory=dict)  # the sampler's keyword options on this process (eta, variance, ...)
    clip_x0: bool = False
    batch_size: int = 250
    to_images: Callable[[Tensor], Tensor] = identity  # sampled x -> images in [-1, 1]: latent decoder / data range
    device: torch.device = torch.device("cpu")

    @property
    def steps(self) -> int:
        """Sampler steps per batch (model calls: `spec.model_calls(steps)`)."""
        return len(self.sigmas) - 1

    @classmethod
    def build(cls, process: Process, shape: tuple[int, int, int], *, sampler: str, steps: int | None,
              spacing: str = "trailing", respacing: str = "", guidance: Guidance = Guidance(), clip_x0: bool = False,
              batch_size: int = 250, to_images: Callable[[Tensor], Tensor] = identity,
              device: torch.device | str = "cpu", **options) -> SamplingPlan:
        """A plan for `process` without a run config; `options` (eta, variance, s_churn, ...) reach the sampler
        where its spec takes them on this process (a name no sampler takes is an error)."""
        spec = sampler_spec(process, sampler)
        check_value("sample.guide", guidance.guide)
        if guidance.interval is not None:  # the guidance intervals' one check (config_checks' rules)
            check_value("sample.guidance_interval_sigma", list(guidance.interval))
        if guidance.interval_t is not None:
            check_value("sample.guidance_interval", list(guidance.interval_t))
            if guidance.interval is not None:
                raise ConfigError(interval_clash(list(guidance.interval), list(guidance.interval_t)))
        return cls(process, spec, tuple(spec.sigmas(process, steps, spacing, respacing)), tuple(shape), guidance,
                   spec.options_for(process, options), clip_x0, batch_size, to_images, torch.device(device))

    @classmethod
    def from_config(cls, cfg: Config, *, device: torch.device | str = "cpu", sampler: str | None = None,
                    steps: int | None = None, guidance: float | None = None, guide: str | None = None,
                    eta: float | None = None, batch_size: int | None = None) -> SamplingPlan:
        """The plan of a run's config; the arguments override sample.sampler, .steps, .guidance, .guide, .eta,
        .batch_size."""
        sc, m = cfg.sample, cfg.model
        t_interval = list(sc.guidance_interval)  # [0, 1], the default, guides everywhere
        plan_guidance = Guidance(
            scale=sc.guidance if guidance is None else guidance, guide=guide or sc.guide, null_label=m.num_classes or None,
            interval=None if sc.guidance_interval_sigma is None else tuple(sc.guidance_interval_sigma),
            interval_t=None if t_interval == [0, 1] else tuple(t_interval),
            guided_channels=m.in_channels if cfg.diffusion.learn_sigma else None)
        plan = cls.build(build_process(cfg.diffusion), (m.in_channels, m.image_size, m.image_size),
                         sampler=sampler or sc.sampler, steps=steps or sc.steps, spacing=sc.spacing,
                         respacing=sc.respacing, guidance=plan_guidance, clip_x0=sc.clip_x0,
                         batch_size=batch_size or sc.batch_size, to_images=data_range(cfg), device=device,
                         eta=sc.eta if eta is None else eta, variance=sc.variance)
        decode = decoder_for(cfg, plan.device)  # latent diffusion: latents -> images through the first stage; else None
        return plan if decode is None else replace(plan, to_images=decode)  # loaded once the rest is known to be valid

    @torch.no_grad()
    def sample(self, model: ModelFn, n: int, *, labels: Tensor | None = None, seed: int = 0,
               batch_size: int | None = None, progress: bool = False, trajectory: list[Tensor] | None = None,
               guide: ModelFn | None = None) -> Tensor:
        """n samples of `model` as uint8 (n, C, H, W); sample i depends only on (seed, i, label i).

        `guide`: the guide model of autoguidance (`guidance.guide == "auto"`), with the model's interface.

        `trajectory`: a list that receives the model's input x_t (n, C, H, W, uint8) at every model call,
        the denoising trajectory, then the samples themselves.
        """
        g, batch_size = self.guidance, batch_size or self.batch_size
        if labels is not None and g.null_label is not None and int(labels.max()) >= g.null_label:
            raise ConfigError(f"class {int(labels.max())} out of range: the model has {g.null_label} classes")
        if (g.guide == "auto") != (guide is not None):
            raise ConfigError("sample.guide=auto needs a guide model (--guide-weights / sample.guide_weights)"
                              if guide is None else f"a guide model was given, but sample.guide is '{g.guide}', not auto")
        scale = 1.0 if g.guide == "none" else g.scale
        n_batches = -(-n // batch_size)
        # Off a terminal (CI, log files) refresh rarely instead of flooding the log.
        bar = tqdm(total=self.steps * n_batches, disable=not progress, unit="step", leave=False,
                   mininterval=0.1 if sys.stderr.isatty() else 30,
                   desc=f"{self.spec.name} {self.steps} steps x {n_batches} batch{'es' if n_batches > 1 else ''}")
        out, frames = [], []
        for start in range(0, n, batch_size):
            idx = range(start, min(start + batch_size, n))
            noise = PerSampleNoise(seed, idx)
            x = noise.randn_like(torch.empty(len(idx), *self.shape)).to(self.device)
            y = labels[start : start + len(idx)].to(self.device) if (labels is not None and g.null_label) else None
            watch = None
            if trajectory is not None:
                frames.append(batch_frames := [])
                watch = lambda x_t, kept=batch_frames: kept.append(self.images(x_t))  # noqa: E731
            denoiser = guided_denoiser(self.process, model, y, scale, g.null_label, interval=g.interval,
                                       interval_t=g.interval_t, clip_x0=self.clip_x0,
                                       guided_channels=g.guided_channels, watch=watch, guide=guide)
            x = run_sampler(self.spec, self.process, denoiser, x, list(self.sigmas), noise=noise.randn_like,
                            progress=bar.update, options=self.options)
            out.append(self.images(x))
        bar.close()
        images = torch.cat(out)
        if trajectory is not None:
            trajectory.extend(torch.cat(step) for step in zip(*frames))
            trajectory.append(images)
        return images

    def images(self, x: Tensor) -> Tensor:
        """Sampled states (or a model's input x_t) as uint8 images on the CPU."""
        return to_uint8(self.to_images(x)).cpu()


def training_guide(cfg: Config) -> str:
    """The guide of the grids and evaluations drawn during training: the run's sample.guide, but classifier-free for
    auto, whose guide is picked from the finished run's weights (`generation.load_guide`)."""
    return "cfg" if cfg.sample.guide == "auto" else cfg.sample.guide


def data_range(cfg: Config) -> Callable[[Tensor], Tensor]:
    """The inversion of the run's data normalisation: back from unit variance to [-1, 1] (see data.normalize)."""
    if cfg.data.normalize == "none":
        return identity
    mean, std = cfg.data.mean, cfg.data.std
    return lambda x: x * std + mean
