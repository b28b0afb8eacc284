"""The diffusers scheduler that samples an exported run as difftrain does: its class and config.

Our schedules are diffusers' by definition (`processes.gaussian.make_betas`): linear is `linear`,
sqrt_linear (LDM's) is `scaled_linear`, cosine (capped at 0.999) is `squaredcos_cap_v2`; diffusers
keeps them in float32. Our spacings are its `timestep_spacing` (steps_offset 0), our DDIM ends at
alpha_bar = 1 (`set_alpha_to_one`), our clip_x0 is `clip_sample` (range 1). Flow runs use FLUX/SD3's
FlowMatch schedulers with the run's shift (`processes.flow.flow_sigmas` equals their sigmas).
"""

from __future__ import annotations

import warnings

from difftrain.config import Config, ConfigError

BETA_SCHEDULES = {"linear": "linear", "sqrt_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
SCHEDULERS = {  # sample.sampler -> diffusers scheduler class, per process
    "ddpm": {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
             "heun": "HeunDiscreteScheduler", "dpmpp-2m": "DPMSolverMultistepScheduler",
             "dpmpp-2m-sde": "DPMSolverMultistepScheduler"},
    "flow": {"euler": "FlowMatchEulerDiscreteScheduler", "heun": "FlowMatchHeunDiscreteScheduler"},
}
VARIANCE_TYPES = {"small": "fixed_small", "large": "fixed_large", "learned": "learned_range"}
ZERO_SNR_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler")
DPM_ALGORITHMS = {"dpmpp-2m": "dpmsolver++", "dpmpp-2m-sde": "sde-dpmsolver++"}


def scheduler_config(cfg: Config) -> tuple[str, dict]:
    """(diffusers scheduler class name, its config) for the run's process and default sampler (cfg.sample)."""
    d, s = cfg.diffusion, cfg.sample
    if d.process == "flow":
        name = SCHEDULERS["flow"].get(s.sampler, "FlowMatchEulerDiscreteScheduler")
        return name, dict(num_train_timesteps=d.timesteps, shift=d.shift)
    if d.process != "ddpm":
        raise ConfigError(f"diffusion.process={d.process} has no diffusers scheduler; export supports ddpm and flow")
    if s.respacing:
        warnings.warn(f"sample.respacing={s.respacing!r} (guided-diffusion) has no diffusers equivalent; "
                      f"the exported scheduler spaces sample.steps by sample.spacing")
    # A learned-variance model outputs 2C channels: only DDPMScheduler (variance_type learned_range) reads them.
    sampler = "ddpm" if d.learn_sigma else s.sampler
    name = SCHEDULERS["ddpm"].get(sampler, "DDIMScheduler")
    out = dict(num_train_timesteps=d.timesteps, beta_schedule=BETA_SCHEDULES[d.schedule], beta_start=d.beta_start,
               beta_end=d.beta_end, prediction_type=PREDICTION_TYPES[d.prediction],
               timestep_spacing=s.spacing if s.spacing != "karras" else "linspace")
    if d.zero_terminal_snr:  # Lin et al. 2024: diffusers rescales the same way (rescale_betas_zero_snr)
        if name not in ZERO_SNR_SCHEDULERS:
            raise ConfigError(f"diffusion.zero_terminal_snr with sample.sampler={s.sampler}: diffusers' {name} cannot "
                              f"rescale to zero terminal SNR; export with sample.sampler=ddim or ddpm")
        out.update(rescale_betas_zero_snr=True)
    karras = s.spacing == "karras"
    if name == "DDPMScheduler":
        variance = s.variance if s.variance != "auto" else "learned" if d.learn_sigma else "small"
        out.update(variance_type=VARIANCE_TYPES[variance], clip_sample=s.clip_x0, clip_sample_range=1.0)
    elif name == "DDIMScheduler":
        out.update(clip_sample=s.clip_x0, clip_sample_range=1.0, set_alpha_to_one=True, steps_offset=0)
    else:
        out.update(use_karras_sigmas=karras)
        if name == "DPMSolverMultistepScheduler":
            out.update(algorithm_type=DPM_ALGORITHMS[sampler], solver_order=2)
        karras = False
    if karras:
        warnings.warn(f"sample.spacing=karras has no {name} equivalent; the exported scheduler uses linspace")
    return name, out
