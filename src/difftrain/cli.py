"""Command line: `difftrain train | sample | recipes`. It only builds typed configs and calls the library."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import yaml

from difftrain.config import ConfigError, load_config, recipe_names, recipe_text


def _error_types() -> tuple[type[BaseException], ...]:
    from difftrain.checkpoint import CheckpointError
    from difftrain.data import DataError
    from difftrain.training import TrainingError

    return (ConfigError, CheckpointError, DataError, TrainingError)


def parse_classes(text: str, num_classes: int) -> list[int] | None:
    """`all`, `3`, `0-9` or `1,4,7` -> class indices."""
    if text == "all":
        return None
    classes: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            classes.extend(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ConfigError(f"--classes '{text}': use all, a class (3), a range (0-9) or a list (1,4,7)") from None
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ConfigError(f"--classes: {bad} out of range; the model has classes 0..{num_classes - 1}")
    return classes


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.recipe, args.overrides)
    if args.dry_run:
        print(cfg.to_yaml(), end="")
        return 0
    from difftrain.training import train

    train(cfg)
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from difftrain.generation import OUTPUT_FORMATS, cycled_labels, generate, load_run, write_samples

    if args.format not in OUTPUT_FORMATS:
        raise ConfigError(f"unknown --format '{args.format}'; choose from {', '.join(OUTPUT_FORMATS)}")
    run = load_run(args.run, weights=args.ema, device=args.device)
    cfg = run.cfg
    if args.spacing:
        cfg.sample.spacing = args.spacing
    if args.clip_x0 is not None:
        cfg.sample.clip_x0 = args.clip_x0
    num_classes = cfg.model.num_classes or 0
    classes = parse_classes(args.classes, num_classes) if (num_classes and args.classes) else None
    labels = cycled_labels(args.n, num_classes, classes)
    images = generate(run.model, cfg, args.n, labels=labels, seed=args.seed, sampler=args.sampler, steps=args.steps,
                      guidance=args.guidance, eta=args.eta, batch_size=args.batch_size, progress=not args.quiet)
    default_out = {"grid": "samples.png", "npz": "samples.npz", "png-dir": "samples"}[args.format]
    out = write_samples(images, labels, Path(args.out or default_out), args.format, run.class_names)
    print(f"wrote {len(images)} samples ({args.format}) from {run.source} (step {run.step}) to {out}")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    for name in recipe_names():
        data = yaml.safe_load(recipe_text(name)) or {}
        print(f"{name:24s} {data.get('description', '')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="difftrain", description="Train, sample and evaluate image diffusion models.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a recipe", description="Train RECIPE (a shipped name or a .yaml path), "
                       "with section.key=value overrides, e.g. `difftrain train digits train.steps=2000 run_dir=runs/d2`.")
    t.add_argument("recipe", help="recipe name (see `difftrain recipes`) or path to a YAML file")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    t.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="sample from a trained run", description="Sample from RUN (a run directory or a checkpoint file).")
    s.add_argument("run", help="run directory or checkpoint .pt")
    s.add_argument("--n", type=int, default=100, help="number of samples (default 100)")
    s.add_argument("--sampler", choices=["ddim", "ddpm"], default=None, help="default: the recipe's")
    s.add_argument("--steps", type=int, default=None, help="sampling steps (ddim); ddpm always walks all timesteps")
    s.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (1 = none, 0 = unconditional)")
    s.add_argument("--eta", type=float, default=None, help="DDIM eta (0 deterministic)")
    s.add_argument("--spacing", choices=["leading", "trailing", "linspace"], default=None)
    s.add_argument("--clip-x0", dest="clip_x0", action=argparse.BooleanOptionalAction, default=None)
    s.add_argument("--classes", default="all", help="all, 3, 0-9 or 1,4,7 (labels cycle through them)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=None)
    s.add_argument("--ema", choices=["ema", "raw"], default="ema", help="EMA or raw weights")
    s.add_argument("--device", default="auto")
    s.add_argument("--format", default="grid", help="grid (PNG), npz (guided-diffusion arr_0/arr_1) or png-dir")
    s.add_argument("--out", default=None, help="output path (default samples.png / samples.npz / samples/)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_sample)

    r = sub.add_parser("recipes", help="list the shipped recipes")
    r.set_defaults(func=cmd_recipes)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.formatwarning = lambda msg, cat, *a, **k: f"difftrain: warning: {msg}\n"
    try:
        return args.func(args)
    except _error_types() as e:
        print(f"difftrain: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
