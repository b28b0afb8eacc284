"""Timestep respacing equal to guided-diffusion's `space_timesteps` (respace.py), Karras timesteps,
the grids of sigmas the processes give the samplers, and the sampler table's specs."""

import pytest
import torch

from difftrain.config import ConfigError, DiffusionConfig
from difftrain.processes import GaussianDiffusion, Schedule, build_process, flow_sigmas
from difftrain.samplers import (
    SAMPLERS,
    karras_timesteps,
    model_calls,
    respaced_timesteps,
    sampler_names,
    sampler_steps,
    sampler_timesteps,
    sampling_sigmas,
    space_timesteps,
)


def reference_space_timesteps(num_timesteps, section_counts):
    """guided-diffusion/improved-diffusion respace.py, verbatim but for the error type."""
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired_count = int(section_counts[len("ddim"):])
            for i in range(1, num_timesteps):
                if len(range(0, num_timesteps, i)) == desired_count:
                    return set(range(0, num_timesteps, i))
            raise ValueError(f"cannot create exactly {num_timesteps} steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"cannot divide section of {size} steps into {section_count}")
        if section_count <= 1:
            frac_stride = 1
        else:
            frac_stride = (size - 1) / (section_count - 1)
        cur_idx = 0.0
        taken_steps = []
        for _ in range(section_count):
            taken_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        all_steps += taken_steps
        start_idx += size
    return set(all_steps)


@pytest.mark.parametrize("T,counts", [
    (300, "10,15,20"), (300, [10, 15, 20]), (1000, "250"), (1000, "ddim50"), (1000, "ddim25"), (1000, "50"),
    (1000, "100"), (1000, "1000"), (1000, "1"), (4000, "25,50,100"), (1000, "7,3"), (50, "ddim10"), (1000, "27"),
])
def test_space_timesteps_equals_guided_diffusion(T, counts):
    assert space_timesteps(T, counts) == reference_space_timesteps(T, counts)


def test_space_timesteps_documented_examples():
    # "300 timesteps and section counts [10,15,20]: the first 100 strided to 10, the second 100 to 15, the last 100 to 20"
    steps = sorted(space_timesteps(300, "10,15,20"))
    assert len(steps) == 45
    assert [sum(lo <= s < lo + 100 for s in steps) for lo in (0, 100, 200)] == [10, 15, 20]
    assert steps[:10] == [0, 11, 22, 33, 44, 55, 66, 77, 88, 99]
    assert sorted(space_timesteps(1000, "ddim50")) == list(range(0, 1000, 20))  # the DDIM paper's stride
    assert min(space_timesteps(1000, "250")) == 0 and max(space_timesteps(1000, "250")) == 999
    assert len(space_timesteps(1000, "250")) == 250
    assert respaced_timesteps(1000, "ddim4") == [750, 500, 250, 0]


def test_space_timesteps_errors_name_the_problem():
    with pytest.raises(ConfigError, match="exactly 7 steps"):
        space_timesteps(10, "ddim7")
    with pytest.raises(ConfigError, match="section of 100 steps into 200"):
        space_timesteps(300, "200,10,10")
    with pytest.raises(ConfigError, match="ddimN"):
        space_timesteps(1000, "fast")


def test_sampler_timesteps_respacing_overrides_steps_and_karras_is_fractional():
    s = Schedule.make("linear", 1000)
    assert sampler_timesteps(s, 10, "trailing", respacing="ddim50") == respaced_timesteps(1000, "ddim50")
    assert sampler_timesteps(s, 4, "leading") == [750, 500, 250, 0]
    ts = sampler_timesteps(s, 6, "karras")
    assert ts == karras_timesteps(s, 6) and len(ts) == 6
    assert ts[0] == pytest.approx(999) and ts[-1] == pytest.approx(0)
    sig = [s.sigma_at(t) for t in ts]
    # Karras et al. eq. 5: sigma^(1/7) linear in the step index
    root = torch.tensor(sig, dtype=torch.float64) ** (1 / 7)
    torch.testing.assert_close(root.diff(), root.diff()[:1].expand(5), rtol=1e-9, atol=1e-12)
    for t in (0, 1, 500.25, 998.5, 999):
        assert s.t_at(s.sigma_at(t)) == pytest.approx(t, abs=1e-9)


@pytest.mark.parametrize("bad", ["ddim", "ddimx", "ddim-5"])
def test_a_ddim_respacing_without_a_count_is_a_config_error(bad):
    """`--respacing ddim` raised a bare ValueError (a traceback from the CLI); it is a ConfigError that says the forms."""
    with pytest.raises(ConfigError, match=f"respacing '{bad}': use a count"):
        space_timesteps(1000, bad)


def test_one_table_with_specs_and_nfe():
    assert SAMPLERS.names() == sampler_names() == ["ddim", "ddpm", "dpmpp-2m", "dpmpp-2m-sde", "euler", "heun"]
    flow, vp = build_process(DiffusionConfig(process="flow")), build_process(DiffusionConfig(process="ddpm"))
    assert sampler_names(flow) == ["euler", "heun"] and sampler_names(vp) == sampler_names()
    assert SAMPLERS["euler"].spaces == {"ve": ("s_churn", "s_tmin", "s_tmax", "s_noise"), "flow": ()}
    assert SAMPLERS["ddim"].spaces == {"ve": ("eta",)} and SAMPLERS["ddpm"].spaces == {"ve": ("variance",)}
    assert model_calls("heun", 10) == 19 and model_calls("heun", 1) == 1 and model_calls("dpmpp-2m", 10) == 10
    with pytest.raises(ConfigError, match="choose from"):
        SAMPLERS["dpm++"]


def test_process_grids_end_at_zero_and_ddpm_walks_every_timestep():
    vp = GaussianDiffusion(Schedule.make("linear", 1000))
    sig = vp.sampling_sigmas(4, "leading")
    assert sig == [vp.schedule.sigma_of(t) for t in (750, 500, 250, 0)] + [0.0]
    assert vp.sampling_sigmas(None) == vp.schedule.sigmas.flip(0).tolist() + [0.0]
    ddim10 = respaced_timesteps(1000, "ddim10")
    assert vp.sampling_sigmas(4, respacing="ddim10") == [vp.schedule.sigma_of(t) for t in ddim10] + [0.0]
    assert sampling_sigmas(vp, "ddpm", 4) == vp.sampling_sigmas(None) and sampler_steps(vp, "ddpm", 4) == 1000
    assert sampler_steps(vp, "ddpm", 4, respacing="ddim10") == 10 and sampler_steps(vp, "ddim", 4) == 4
    flow = build_process(DiffusionConfig(process="flow", shift=3.0))
    assert flow.sampling_sigmas(6) == flow_sigmas(6, 3.0, 1000) and flow.sampling_sigmas(6)[0] == 1.0
    assert sampler_steps(flow, "heun", 6, spacing="karras", respacing="ddim10") == 6  # one grid for flow
