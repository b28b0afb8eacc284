"""`difftrain ema RUN --sigma-rel 0.05,0.1,0.2`: post-hoc EMA (training/phema.py) from the run's snapshots.

Writes RUN/weights-phema-SIGMA.safetensors for each width; with --score it samples each and prints one
table, so the width is picked after training, without retraining. Importing this module does not import
torch (`difftrain --help` answers at once).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from difftrain.config_checks import COUNT_OPTION, NUMBER_OPTION, RULES, SEED_OPTION, option

# The numbers of each metric in the table: the first one ranks the widths (lower is better).
SCORE_COLUMNS = {
    "classifier": (("frechet_distance", "Fréchet"), ("accuracy", "accuracy")),
    "digits": (("frechet_distance", "Fréchet"), ("accuracy", "accuracy")),
    "fid": (("frechet_inception_distance", "FID"), ("kernel_inception_distance_mean", "KID")),
}


def _widths(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


WIDTHS_OPTION = option(_widths, RULES["train.posthoc_ema"])


def cmd_ema(args: argparse.Namespace) -> int:
    from difftrain.training.phema import reconstruct

    results = reconstruct(Path(args.run), args.sigma_rel, step=args.step)
    for r in results:
        print(f"wrote {r.path} (sigma_rel {r.sigma_rel:g}, gamma {r.gamma:.2f}, step {r.step}, "
              f"from {r.snapshots} snapshot steps, profile error {r.profile_error:.1%})")
    if args.score:
        rows = score(args, results)
        print(format_table(rows))
        if args.json:
            from difftrain.checkpoint import atomic_write_text

            atomic_write_text(Path(args.json), json.dumps(rows, indent=2) + "\n", what="scores")
            print(f"wrote {args.json}")
    else:
        label = f"phema-{results[0].sigma_rel!r}"
        print(f"sample with: difftrain sample {args.run} --ema {label}   (or score them: add --score)")
    return 0


def score(args: argparse.Namespace, results: list) -> list[dict]:
    """Samples of each reconstruction (same seed and labels) scored with the run's metric."""
    from difftrain.checkpoint import load_model_state, load_weights_file
    from difftrain.evaluation.report import default_metric, evaluate_samples
    from difftrain.generation import cycled_labels, generate, load_run
    from difftrain.runtime import resolve_device

    run = load_run(args.run, weights="ema", device=args.device)
    metric = args.metric or default_metric(run.cfg.data)
    labels = cycled_labels(args.n, run.cfg.model.num_classes or 0)
    rows = []
    for r in results:
        tensors, _ = load_weights_file(r.path)
        load_model_state(run.model, tensors, str(r.path))
        images = generate(run.model, run.cfg, args.n, labels=labels, seed=args.seed, sampler=args.sampler,
                          steps=args.steps, guidance=args.guidance, batch_size=args.batch_size, progress=not args.quiet)
        result = evaluate_samples(images, labels, metric, data=run.cfg.data, cache=args.cache_dir,
                                  inception_weights=args.inception_weights, device=str(resolve_device(args.device)))
        rows.append({"sigma_rel": r.sigma_rel, "gamma": r.gamma, "step": r.step, "file": str(r.path), "n": args.n,
                     "seed": args.seed, **result})
        print(f"sigma_rel {r.sigma_rel:g}: scored {args.n} samples", file=sys.stderr)
    return rows


def format_table(rows: list[dict]) -> str:
    """sigma_rel, gamma and the metric's numbers, one line per width; * marks the best (lowest first number)."""
    columns = SCORE_COLUMNS[rows[0]["metric"]]
    head = f"  {'sigma_rel':>9s}  {'gamma':>7s}" + "".join(f"  {title:>10s}" for _, title in columns) + "  file"
    best = min(range(len(rows)), key=lambda i: rows[i][columns[0][0]])
    lines = [f"post-hoc EMA at step {rows[0]['step']}: {rows[0]['n']} samples each, seed {rows[0]['seed']}, "
             f"{rows[0]['metric']} metric (* best {columns[0][1]})", head]
    for i, row in enumerate(rows):
        cells = "".join(f"  {row[key]:10.4f}" if row.get(key) is not None else f"  {'n/a':>10s}" for key, _ in columns)
        lines.append(f"{'*' if i == best else ' '} {row['sigma_rel']:9.4g}  {row['gamma']:7.2f}{cells}  {row['file']}")
    return "\n".join(lines)


def add_ema_command(sub) -> None:
    e = sub.add_parser("ema", help="post-hoc EMA: the EMA of any width from a run's snapshots",
                       description="Reconstruct the power-function EMA of each width sigma_rel from RUN's "
                       "snapshots (a run trained with train.posthoc_ema, e.g. [0.05,0.1]; Karras et al. 2024, "
                       "EDM2) and write RUN/weights-phema-SIGMA.safetensors; sample one with "
                       "`difftrain sample RUN --ema phema-SIGMA`. --score samples and scores each.")
    e.add_argument("run", help="run directory (with ema-snapshots/)")
    e.add_argument("--sigma-rel", type=WIDTHS_OPTION, required=True, metavar="S1,S2,...",
                   help="widths relative to the training time, in (0, 0.2886), e.g. 0.05,0.1,0.2")
    e.add_argument("--step", type=COUNT_OPTION, default=None, help="the snapshot step to reconstruct at (default: newest)")
    e.add_argument("--score", action="store_true", help="sample each reconstruction and print a table of scores")
    e.add_argument("--n", type=COUNT_OPTION, default=1000, help="--score: samples per width (default 1000)")
    e.add_argument("--metric", choices=["classifier", "digits", "fid"], default=None,
                   help="--score: default the classifier metric where the data set has one, else fid")
    e.add_argument("--sampler", default=None, help="--score: default the recipe's")
    e.add_argument("--steps", type=COUNT_OPTION, default=None)
    e.add_argument("--guidance", type=NUMBER_OPTION, default=None)
    e.add_argument("--seed", type=SEED_OPTION, default=0)
    e.add_argument("--batch-size", type=COUNT_OPTION, default=None)
    e.add_argument("--device", default="auto")
    e.add_argument("--cache-dir", default=None, help="classifier / reference statistics cache")
    e.add_argument("--inception-weights", default=None, metavar="FILE", help="--metric fid: the Inception weights")
    e.add_argument("--json", default=None, metavar="OUT", help="--score: also write the rows as JSON")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_ema)
