"""Sampling images/s per sampler and number of model calls (NFE), beside a diffusers pipeline loop.

The digits recipe's model (random weights: speed does not depend on them) draws a batch of
class-conditional samples with classifier-free guidance through a `sampling.SamplingPlan` (built once,
outside the timing) for every VP sampler at each step count. The peer is what a diffusers pipeline does: `UNet2DModel` with
the parameter count closest to ours (`common.matched_unet2d_overrides`) and `DDIMScheduler`, one
`torch.cat([x] * 2)` forward per step for guidance and `scheduler.step` after it, under
`torch.no_grad()`. difftrain's `ddim` with that same UNet2DModel is timed too, which separates the
network's speed (same loop, other model) from the loop's (same model, other loop).

All variants take turns in `--rounds` interleaved rounds; medians are reported.

    .venv/bin/python bench/sample_throughput.py            # batch 128, 50 and 10 steps, ~4 min on 2 idle cores
    .venv/bin/python bench/sample_throughput.py --quick    # batch 50, 10 steps, 1 round

Writes bench/results/sample_throughput.json and .md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    interleaved,
    machine,
    matched_unet2d_overrides,
    median,
    n_params,
    setup_threads,
    table,
    trainer,
    write_results,
)

SAMPLERS = ("ddim", "ddpm", "euler", "heun", "dpmpp-2m", "dpmpp-2m-sde")


@torch.no_grad()
def diffusers_pipeline(unet, cfg, labels: torch.Tensor, steps: int, guidance: float, seed: int = 0) -> torch.Tensor:
    """The loop of diffusers' class-conditional pipelines: DDIMScheduler, CFG by batching [x] * 2."""
    from diffusers import DDIMScheduler

    d = cfg.diffusion
    scheduler = DDIMScheduler(num_train_timesteps=d.timesteps, beta_schedule="linear", beta_start=d.beta_start,
                              beta_end=d.beta_end, clip_sample=False, timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    m = cfg.model
    x = torch.randn(len(labels), m.in_channels, m.image_size, m.image_size, generator=torch.Generator().manual_seed(seed))
    class_labels = torch.cat([labels, torch.full_like(labels, m.num_classes)])
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([x] * 2), t)
        eps = unet(model_input, t, class_labels=class_labels).sample
        eps_cond, eps_uncond = eps.chunk(2)
        eps = eps_uncond + guidance * (eps_cond - eps_uncond)
        x = scheduler.step(eps, t, x).prev_sample
    return x


def main() -> None:
    from difftrain.config import thaw
    from difftrain.generation import cycled_labels
    from difftrain.samplers import SAMPLERS as TABLE
    from difftrain.samplers import model_calls
    from difftrain.sampling import SamplingPlan

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="digits")
    p.add_argument("--batch", type=int, default=128, help="samples per batch (default: the training batch)")
    p.add_argument("--steps", default="50,10", help="comma-separated step counts")
    p.add_argument("--samplers", default=",".join(SAMPLERS))
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--quick", action="store_true", help="batch 50, 10 steps, 1 round")
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    args = p.parse_args()
    if args.quick:
        args.batch, args.steps, args.rounds = 50, "10", 1
    setup_threads(args.threads)
    step_counts = [int(s) for s in args.steps.split(",")]
    samplers = [s for s in args.samplers.split(",") if s]

    with tempfile.TemporaryDirectory() as tmp:
        ours = trainer(args.recipe, [], Path(tmp) / "ours")
        cfg = ours.cfg
        m = cfg.model
        overrides, _ = matched_unet2d_overrides(n_params(ours.task.model), m.image_size, m.in_channels, m.num_classes or 0,
                                                list(m.channel_mult), m.num_res_blocks, list(m.attention_resolutions))
        peer = trainer(args.recipe, overrides, Path(tmp) / "peer")
    model, peer_model = ours.task.model.eval(), peer.task.model.eval()
    labels = cycled_labels(args.batch, m.num_classes)

    fns, meta = {}, {}
    for steps in step_counts:
        for name in samplers:
            key = f"difftrain {name} {steps}"
            run_cfg = thaw(cfg)  # a writable copy of the run's resolved (frozen) config
            if TABLE[name].every_timestep:  # ddpm: `steps` of the 1000 timesteps (guided-diffusion respacing)
                run_cfg.sample.respacing = str(steps)
            plan = SamplingPlan.from_config(run_cfg, device=next(model.parameters()).device, sampler=name, steps=steps,
                                            guidance=args.guidance, batch_size=args.batch)  # built once, not timed
            fns[key] = lambda plan=plan: plan.sample(model, args.batch, labels=labels)
            meta[key] = {"side": "difftrain", "model": m.name, "sampler": name, "steps": steps,
                         "nfe": model_calls(name, steps)}
        key = f"difftrain ddim {steps} (UNet2DModel)"
        peer_plan = SamplingPlan.from_config(peer.cfg, device=next(peer_model.parameters()).device, sampler="ddim",
                                             steps=steps, guidance=args.guidance, batch_size=args.batch)
        fns[key] = lambda plan=peer_plan: plan.sample(peer_model, args.batch, labels=labels)
        meta[key] = {"side": "difftrain loop, diffusers model", "model": "UNet2DModel", "sampler": "ddim",
                     "steps": steps, "nfe": steps}
        key = f"diffusers ddim {steps}"
        fns[key] = lambda steps=steps: diffusers_pipeline(peer_model.unet, peer.cfg, labels, steps, args.guidance)
        meta[key] = {"side": "diffusers", "model": "UNet2DModel", "sampler": "DDIMScheduler", "steps": steps,
                     "nfe": steps}
    next(iter(fns.values()))()  # warm-up (thread pool, allocator)
    times, peaks = interleaved(fns, args.rounds, label="sampling: ")

    rows = {}
    for key, v in meta.items():
        s = median(times[key])
        rows[key] = {**v, "seconds": s, "images_per_s": args.batch / s, "rounds_s": times[key]}
    for steps in step_counts:
        base = rows[f"diffusers ddim {steps}"]["images_per_s"]
        for r in rows.values():
            if r["steps"] == steps:
                r["ratio_vs_diffusers"] = r["images_per_s"] / base
    results = {"machine": machine(), "recipe": args.recipe, "batch": args.batch, "guidance": args.guidance,
               "rounds": args.rounds, "quick": args.quick, "params": {"difftrain": n_params(model),
               "diffusers": n_params(peer_model)}, "peer_overrides": overrides, "peak_gflops": median(peaks),
               "rows": rows}

    md = [f"# Sampling throughput ({args.recipe}, CPU, {results['machine']['threads']} threads)", "",
          f"{results['machine']['cpu']}, torch {torch.__version__}, diffusers {results['machine']['diffusers']}, "
          f"{results['machine']['date']}. Batch {args.batch} class-conditional samples, classifier-free guidance "
          f"{args.guidance:g} (one batched forward of 2 x {args.batch} per model call); median of {args.rounds} "
          f"interleaved rounds. difftrain model {m.name} {n_params(model) / 1e6:.2f}M; diffusers UNet2DModel "
          f"{n_params(peer_model) / 1e6:.2f}M driven by a pipeline loop (DDIMScheduler, torch.cat([x] * 2)). "
          f"`bench/sample_throughput.py`.", ""]
    md += table(["variant", "model", "steps", "NFE", "images/s", "vs diffusers pipeline"],
                [[k, r["model"], r["steps"], r["nfe"], f"{r['images_per_s']:.1f}", f"{r['ratio_vs_diffusers']:.2f}x"]
                 for k, r in rows.items()])
    md += ["", f"Load average at the end: {', '.join(f'{x:.2f}' for x in results['machine']['load_average'])}."]
    write_results("sample_throughput" + ("-quick" if args.quick else ""), results, md, args.out)


if __name__ == "__main__":
    main()
