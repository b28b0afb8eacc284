"""Command line: `difftrain train | sample | recipes | data | eval | report | export | ema`.

It only builds typed configs and calls the library; `data` lives in cli_data.py, `ema` in cli_ema.py."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from difftrain.cli_data import add_data_commands
from difftrain.cli_ema import add_ema_command
from difftrain.config import ConfigError, load_config, recipe_names, recipe_text
from difftrain.config_checks import (
    COUNT_OPTION,
    GUIDES,
    NONNEGATIVE_OPTION,
    NUMBER_OPTION,
    SEED_OPTION,
    SIGMA_INTERVAL_OPTION,
    T_INTERVAL_OPTION,
    option,
)
from difftrain.safe_yaml import load_yaml

# argparse's choices, written out so that building the parser (`--help`) does not import torch;
# tests/test_cli_startup.py checks them against samplers.SPACINGS. A --sampler name is checked by the
# samplers.SAMPLERS table itself (its error lists the choices), so a new sampler is one registry line.
SPACING_NAMES = ("leading", "trailing", "linspace", "karras")
SAMPLER_OPTION = option(str, (lambda v: bool(v.strip()), "a sampler name (an unknown one lists the choices)"))


def _error_types() -> tuple[type[BaseException], ...]:
    from difftrain.checkpoint import CheckpointError
    from difftrain.data import DataError
    from difftrain.evaluation import EvaluationError
    from difftrain.report import ReportError
    from difftrain.training import TrainingError

    return (ConfigError, CheckpointError, DataError, TrainingError, EvaluationError, ReportError)


def parse_classes(text: str, num_classes: int) -> list[int] | None:
    """`all`, `3`, `0-9` or `1,4,7` -> class indices."""
    if text == "all":
        return None
    classes: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        try:
            lo, hi = int(lo), int(hi or lo)
        except ValueError:
            raise ConfigError(f"--classes '{text}': use all, a class (3), a range (0-9) or a list (1,4,7)") from None
        if not 0 <= lo <= hi < num_classes:  # also an empty range such as 5-3
            raise ConfigError(f"--classes: {part} out of range; the model has classes 0..{num_classes - 1}")
        classes.extend(range(lo, hi + 1))
    return classes


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.recipe, args.overrides)
    if args.dry_run:
        from difftrain.training.resolve import resolve_for_dry_run
        from difftrain.training.resources import MemoryEstimate, estimate_memory
        from difftrain.training.tasks import resolve_task

        resolve_task(cfg)  # train.task as training resolves it: auto -> the name; a wrong one is refused here too
        # the config the run writes to config.yaml (also refuses a batch larger than the training split)
        cfg, data, unread = resolve_for_dry_run(cfg)
        estimate = f"no memory estimate: {unread}" if data is None else estimate_memory(cfg, data)
        print(cfg.to_yaml(), end="")
        # YAML comments: the output stays a valid config
        print(estimate.describe() if isinstance(estimate, MemoryEstimate) else f"# {estimate}")
        if cfg.train.budget:
            from difftrain.training.budget import describe

            print(f"# {describe(cfg)}")
        return 0
    from difftrain.training import distributed, train

    if distributed.under_torchrun():
        # torchrun's error summary then shows the failing rank's exception and message.
        from torch.distributed.elastic.multiprocessing.errors import record

        record(train)(cfg)
    elif cfg.train.devices > 1:
        return run_torchrun(cfg.train.devices, args)
    else:
        train(cfg)
    return 0


def run_torchrun(nproc: int, args: argparse.Namespace) -> int:
    """`difftrain train ... train.devices=N`: start torchrun with N processes on this machine running the same
    command, and return its exit status. SIGTERM is passed on (torchrun hands it to every rank)."""
    import signal
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "difftrain", "train", args.recipe, *args.overrides]
    print(f"difftrain: train.devices={nproc}: {' '.join(cmd[1:])}", file=sys.stderr)
    proc = subprocess.Popen(cmd)
    old = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signum))
    try:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:  # Ctrl-C reached torchrun and its workers too: wait for their checkpoint
                continue
    finally:
        signal.signal(signal.SIGTERM, old)


def cmd_sample(args: argparse.Namespace) -> int:
    from difftrain.generation import OUTPUT_FORMATS, cycled_labels, load_run, write_samples, write_trajectory

    if args.format not in OUTPUT_FORMATS:
        raise ConfigError(f"unknown --format '{args.format}'; choose from {', '.join(OUTPUT_FORMATS)}")
    if args.format == "png-dir" and args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise ConfigError(f"--out '{args.out}' is a file; --format png-dir writes a folder of PNGs")
    run = load_run(args.run, weights=args.ema, device=args.device)
    cfg = run.cfg
    for key in ("spacing", "respacing", "variance", "clip_x0"):
        if getattr(args, key) is not None:
            setattr(cfg.sample, key, getattr(args, key))
    if args.guidance_interval is not None:  # in sigma; it replaces a run's older t / T interval
        cfg.sample.guidance_interval_sigma, cfg.sample.guidance_interval = args.guidance_interval, [0.0, 1.0]
    if args.guidance_interval_t is not None:
        cfg.sample.guidance_interval = args.guidance_interval_t
    num_classes = cfg.model.num_classes or 0
    classes = parse_classes(args.classes, num_classes) if (num_classes and args.classes) else None
    labels = cycled_labels(args.n, num_classes, classes)
    frames: list | None = [] if args.trajectory else None
    plan = run.plan(sampler=args.sampler, steps=args.steps, guidance=args.guidance, guide=args.guide, eta=args.eta,
                    batch_size=args.batch_size)
    images = plan.sample(run.model, args.n, labels=labels, seed=args.seed, progress=not args.quiet, trajectory=frames,
                         guide=_guide_model(run, plan, args))
    default_out = {"grid": "samples.png", "npz": "samples.npz", "png-dir": "samples"}[args.format]
    out = write_samples(images, labels, Path(args.out or default_out), args.format, run.class_names)
    print(f"wrote {len(images)} samples ({args.format}) from {run.source} (step {run.step}) to {out}")
    if frames is not None:
        path = Path(args.trajectory)
        fmt = "gif" if path.suffix.lower() == ".gif" else "strip"
        write_trajectory(frames, labels, path, fmt=fmt, max_frames=args.trajectory_frames)
        kept = min(args.trajectory_frames, len(frames))
        print(f"wrote the denoising trajectory ({fmt}, {kept} of {len(frames)} frames) to {path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from difftrain.checkpoint import remove_stale_temp_files
    from difftrain.interop.diffusers_export import export_run

    out = Path(args.out)
    remove_stale_temp_files(out.parent, out.name)  # the .OUT.tmp-PID folder of an export killed mid-write
    print(export_run(args.run, args.out, weights=args.ema).summary())
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    for name in recipe_names():
        data = load_yaml(recipe_text(name)) or {}
        print(f"{name:24s} {data.get('description', '')}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from difftrain.evaluation import EvaluationError
    from difftrain.evaluation.report import default_metric, evaluate_samples, format_report

    if args.nll:
        return _eval_nll(args)
    if not args.run and not args.samples:
        raise EvaluationError("give a run directory / checkpoint to sample from, or --samples FILE.npz")
    from difftrain.runtime import resolve_device

    run = data = None
    if args.run:
        from difftrain.evaluation.samples import check_run_dir
        from difftrain.generation import load_run

        check_run_dir(args.run)  # a folder of sample images, of runs, ...: say what it is
        run = load_run(args.run, weights=args.ema, device=args.device)
        data = run.cfg.data
    if args.samples:
        from difftrain.evaluation.samples import load_npz

        images, labels = load_npz(args.samples)
        source = f"{args.samples} ({len(images)} samples)"
    else:
        from difftrain.generation import cycled_labels

        labels = cycled_labels(args.n, run.cfg.model.num_classes or 0)
        plan = run.plan(sampler=args.sampler, steps=args.steps, guidance=args.guidance, guide=args.guide,
                        batch_size=args.batch_size)
        guide = _guide_model(run, plan, args)
        images = plan.sample(run.model, args.n, labels=labels, seed=args.seed, progress=not args.quiet, guide=guide)
        how = {"cfg": "classifier-free", "none": "none", "auto": f"autoguidance by {_guide_weights(run, args)}"}
        source = (f"{run.source} (step {run.step}, {args.ema} weights): {args.n} samples, seed {args.seed}, "
                  f"{plan.spec.name} {plan.steps} steps, guidance {plan.guidance.scale:g} ({how[plan.guidance.guide]})")
    metric = args.metric or default_metric(data)
    result = evaluate_samples(images, labels, metric, data=data, cache=args.cache_dir,
                              inception_weights=args.inception_weights, device=str(resolve_device(args.device)),
                              source=f"'{args.samples}'" if args.samples else f"the samples of '{args.run}'")
    result["samples"] = source
    print(f"samples: {source}")
    print(format_report(result))
    if args.json:
        from difftrain.checkpoint import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps(result, indent=2) + "\n", what="eval results")
        print(f"wrote {args.json}")
    return 0


def _guide_weights(run, args: argparse.Namespace) -> str:
    return args.guide_weights or run.cfg.sample.guide_weights


def _guide_model(run, plan, args: argparse.Namespace):
    """The guide model of `--guide auto` (sample.guide=auto), from --guide-weights or sample.guide_weights; None else."""
    from difftrain.generation import load_guide

    if plan.guidance.guide != "auto":
        if args.guide_weights:
            raise ConfigError(f"--guide-weights names the guide of autoguidance; give --guide auto with it "
                              f"(the guidance is '{plan.guidance.guide}')")
        return None
    return load_guide(run, _guide_weights(run, args)).model


def _eval_nll(args: argparse.Namespace) -> int:
    """`difftrain eval --nll RUN`: bits/dim of the test split under the model's variational bound."""
    import json

    from difftrain.data import load_data
    from difftrain.evaluation import EvaluationError
    from difftrain.evaluation.nll import dataset_bits_per_dim
    from difftrain.generation import load_run
    from difftrain.processes import GaussianDiffusion, build_process

    if not args.run:
        raise EvaluationError("--nll needs a run directory or checkpoint")
    run = load_run(args.run, weights=args.ema, device=args.device)
    process = build_process(run.cfg.diffusion)
    if not isinstance(process, GaussianDiffusion):
        raise EvaluationError(f"--nll needs a Gaussian (ddpm) process, not '{run.cfg.diffusion.process}'")
    if run.cfg.latent.first_stage:
        raise EvaluationError("--nll scores pixel-space runs; this run models first-stage latents (latent.first_stage)")
    test = load_data(run.cfg.data).test
    if test is None or not len(test):
        raise EvaluationError("the run's data set has no test split")
    n = min(args.n, len(test))
    labels = test.labels[:n] if run.cfg.model.num_classes else None
    result = dataset_bits_per_dim(run.model, process, test.images[:n], labels, batch_size=args.batch_size or 256,
                                  seed=args.seed, progress=not args.quiet)
    result["conditional"] = labels is not None
    result["source"] = f"{run.source} (step {run.step}, {args.ema} weights)"
    print(f"{result['source']}: {n} test images, {result['timesteps']} timesteps, {result['variance']} variance"
          f"{', conditioned on the true labels' if labels is not None else ''}")
    print(f"NLL {result['bits_per_dim']:.4f} +- {result['bits_per_dim_std_error']:.4f} bits/dim "
          f"(prior term {result['prior_bits_per_dim']:.2e})")
    if args.json:
        from difftrain.checkpoint import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps(result, indent=2) + "\n", what="eval results")
        print(f"wrote {args.json}")
    return 0


def _add_eval_command(sub) -> None:
    e = sub.add_parser("eval", help="score samples of a run or an .npz", description="Score samples: drawn from RUN "
                       "(a run directory or checkpoint), or read from --samples FILE.npz (guided-diffusion layout: "
                       "arr_0 uint8 NHWC, arr_1 labels). With both, RUN names the data set of the reference.")
    e.add_argument("run", nargs="?", default=None, help="run directory or checkpoint .pt")
    e.add_argument("--samples", default=None, metavar="FILE.npz", help="score these samples instead of sampling")
    e.add_argument("--nll", action="store_true", help="negative log-likelihood (bits/dim) of the test split "
                   "(at most --n images) under the variational bound, all timesteps; Gaussian process only")
    e.add_argument("--metric", choices=["classifier", "digits", "fid"], default=None,
                   help="classifier: offline metric from a small CNN trained on the run's labelled data set (default "
                   "for digits, mnist, fashion_mnist, fonts, emoji; digits is its alias); fid: FID/KID/IS/precision-recall "
                   "through torch-fidelity (needs it installed and the Inception weights on disk)")
    e.add_argument("--n", type=COUNT_OPTION, default=1000, help="samples to draw from RUN (default 1000)")
    e.add_argument("--sampler", type=SAMPLER_OPTION, default=None, help="default: the recipe's")
    e.add_argument("--steps", type=COUNT_OPTION, default=None)
    e.add_argument("--guidance", type=NUMBER_OPTION, default=None, help="guidance weight (default: the recipe's)")
    _guide_options(e)
    e.add_argument("--seed", type=SEED_OPTION, default=0)
    e.add_argument("--batch-size", type=COUNT_OPTION, default=None)
    e.add_argument("--ema", default="ema", metavar="ema|raw|RATE|phema-SIGMA",
                   help="weights to sample with (default ema); phema-SIGMA: a post-hoc EMA from `difftrain ema`")
    e.add_argument("--device", default="auto")
    e.add_argument("--cache-dir", default=None, help="classifier / reference statistics cache "
                   "(default $DIFFTRAIN_CACHE or ~/.cache/difftrain)")
    e.add_argument("--inception-weights", default=None, metavar="FILE",
                   help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth (default: the torch hub cache)")
    e.add_argument("--json", default=None, metavar="OUT", help="also write the numbers as JSON")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_eval)


def cmd_report(args: argparse.Namespace) -> int:
    from difftrain.report import write_comparison, write_report

    if len(args.runs) == 1:
        out = write_report(args.runs[0], args.out)
    else:
        out = write_comparison(args.runs, args.out or "compare.html")
    print(f"wrote {out}")
    return 0


def _add_report_command(sub) -> None:
    r = sub.add_parser("report", help="an HTML page of a run's curves, grids, config and hardware",
                       description="Write RUN/report.html: one self-contained page (no server, no scripts) with the "
                       "resolved config, the metric curves, the grids over training, the final grid, the hardware and "
                       "the time. With several runs, one page (--out, default compare.html) overlays their curves "
                       "and shows their final grids side by side. Works on killed runs: it reports what is on disk.")
    r.add_argument("runs", nargs="+", metavar="RUN", help="run directory (several: a comparison page)")
    r.add_argument("--out", default=None, help="output file (default RUN/report.html, or compare.html for several runs)")
    r.set_defaults(func=cmd_report)


def _guide_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--guide", choices=GUIDES, default=None,
                   help="what --guidance mixes with: cfg (classifier-free, D_u + w (D_c - D_u)), auto (autoguidance, "
                        "D_g + w (D_c - D_g) with the guide of --guide-weights), none (the conditional model); "
                        "default: the recipe's sample.guide")
    p.add_argument("--guide-weights", default=None, metavar="ema-RATE|raw|phema-SIGMA|FILE.pt|FILE.safetensors",
                   help="--guide auto: the guide's weights, of the same architecture: an EMA of the run (ema-0.9), "
                        "raw, a post-hoc EMA, a step's checkpoint (checkpoints/step-0000100.pt: its raw weights) "
                        "or a weights file (default: sample.guide_weights)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="difftrain", description="Train, sample and evaluate image diffusion models.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a recipe", description="Train RECIPE (a shipped name or a .yaml path), "
                       "with section.key=value overrides, e.g. `difftrain train digits train.steps=2000 run_dir=runs/d2`.")
    t.add_argument("recipe", help="recipe name (see `difftrain recipes`) or path to a YAML file")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    t.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="sample from a trained run",
                       description="Sample from RUN (a run directory or a checkpoint file).")
    s.add_argument("run", help="run directory or checkpoint .pt")
    s.add_argument("--n", type=COUNT_OPTION, default=100, help="number of samples (default 100)")
    s.add_argument("--sampler", type=SAMPLER_OPTION, default=None,
                   help="ddim, ddpm, euler, heun, dpmpp-2m, ... (default: the recipe's; process flow offers euler and heun)")
    s.add_argument("--steps", type=COUNT_OPTION, default=None, help="sampling steps; ddpm walks all timesteps unless --respacing")
    s.add_argument("--respacing", default=None, help='guided-diffusion timestep_respacing: "250", "ddim50", "10,15,20"')
    s.add_argument("--guidance", type=NUMBER_OPTION, default=None,
                   help="guidance weight w (1 = the conditional model; 0 = unconditional, or the guide with --guide auto)")
    _guide_options(s)
    s.add_argument("--guidance-interval", type=SIGMA_INTERVAL_OPTION, default=None, metavar="SIGMA_LO,SIGMA_HI",
                   help="guide only where SIGMA_LO < sigma <= SIGMA_HI, the sampler's noise level (e.g. 0.28,5.42; "
                        "HI may be inf); elsewhere the conditional model")
    s.add_argument("--guidance-interval-t", type=T_INTERVAL_OPTION, default=None, metavar="LO,HI",
                   help="the older interval in the model's time: guide only where LO <= t/T <= HI")
    s.add_argument("--eta", type=NONNEGATIVE_OPTION, default=None, help="DDIM eta (0 deterministic)")
    s.add_argument("--variance", choices=["auto", "small", "large", "learned"], default=None, help="ddpm variance")
    s.add_argument("--spacing", choices=SPACING_NAMES, default=None, help="karras: Karras et al. 2022 sigmas")
    s.add_argument("--clip-x0", dest="clip_x0", action=argparse.BooleanOptionalAction, default=None)
    s.add_argument("--classes", default="all", help="all, 3, 0-9 or 1,4,7 (labels cycle through them)")
    s.add_argument("--seed", type=SEED_OPTION, default=0)
    s.add_argument("--batch-size", type=COUNT_OPTION, default=None)
    s.add_argument("--ema", default="ema", metavar="ema|raw|RATE",
                   help="weights: the first EMA (default), raw, the EMA of a rate in train.ema_rates (e.g. 0.9999), "
                        "phema-SIGMA (a post-hoc EMA written by `difftrain ema`) or a .safetensors path")
    s.add_argument("--device", default="auto")
    s.add_argument("--format", default="grid", help="grid (PNG), npz (guided-diffusion arr_0/arr_1) or png-dir")
    s.add_argument("--out", default=None, help="output path (default samples.png / samples.npz / samples/)")
    s.add_argument("--trajectory", default=None, metavar="PATH.gif|PATH.png",
                   help="also write the denoising trajectory: an animated GIF, or a strip PNG (one row per sample)")
    s.add_argument("--trajectory-frames", type=COUNT_OPTION, default=20, help="frames in the trajectory (default 20)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_sample)

    r = sub.add_parser("recipes", help="list the shipped recipes")
    r.set_defaults(func=cmd_recipes)

    x = sub.add_parser("export", help="write a run as a diffusers folder with a model card", description="Write RUN (a run "
                       "directory or checkpoint) to the new folder OUT in diffusers' layout: model, scheduler, README.md.")
    x.add_argument("run")
    x.add_argument("out")
    x.add_argument("--ema", default="ema", metavar="raw|RATE", help="weights: the first EMA (default), raw, or an EMA rate")
    x.set_defaults(func=cmd_export)

    add_data_commands(sub)
    _add_eval_command(sub)
    _add_report_command(sub)
    add_ema_command(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.formatwarning = lambda msg, cat, *a, **k: f"difftrain: warning: {msg}\n"
    if args.command in ("train", "sample", "eval", "ema"):  # model work: keep freed activations (runtime.keep_freed_memory)
        from difftrain.runtime import keep_freed_memory

        keep_freed_memory()
    try:
        return args.func(args)
    except _error_types() as e:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = f" (rank {os.environ.get('RANK')} of {world})" if world > 1 else ""
        print(f"difftrain: error{rank}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
