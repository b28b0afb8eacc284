"""The guidance and sampler trade-off of a trained run: conditional accuracy against Fréchet distance and near-copies.

For each guidance scale (with the first sampler) and each further sampler (at the chosen guidance), the
run's default EMA weights draw `--n` class-conditional samples from the same seed, scored by the
classifier-feature metric (`difftrain.evaluation.classifier`: accuracy, Fréchet distance with the real-data
floor, near-copies of training images against the test split's own rate). A recipe's default guidance
and sampler are picked from this table: the lowest Fréchet distance among the rows whose accuracy is at
least 0.98 and whose near-copy rate stays at or below the test split's.

    .venv/bin/python bench/guidance_curve.py RUN --name mnist                    # n=1000
    .venv/bin/python bench/guidance_curve.py RUN --guidance 1,2 --samplers dpmpp-2m:20 --n 100 --name quick

Autoguidance (Karras et al. 2024): `--guides ema-0.9,checkpoints/step-0000100.pt --auto-guidance 1.5,2,3` adds,
with the first sampler, a row per guide's weights and weight w (`difftrain sample --guide auto --guide-weights`);
`--seeds 0,1` repeats every row per sampling seed. Writes bench/results/guidance-NAME.json, .md and .png.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, table, write_results  # noqa: E402

MIN_ACCURACY = 0.98  # issue 16's bar for class-conditional samples


def cell(run, labels, sampler: str, steps: int, guidance: float, guide: str = "cfg", seed: int = 0) -> dict:
    """One row: `guide` is cfg (classifier-free) or the guide's weights of autoguidance (`load_guide`)."""
    from difftrain.evaluation.classifier import classifier_metrics, load_reference
    from difftrain.generation import load_guide

    start = time.perf_counter()
    plan = run.plan(sampler=sampler, steps=steps, guidance=guidance, guide="cfg" if guide == "cfg" else "auto",
                    batch_size=500)
    images = plan.sample(run.model, len(labels), labels=labels, seed=seed,
                         guide=None if guide == "cfg" else load_guide(run, guide).model)
    m = classifier_metrics(images, labels, load_reference(run.cfg.data, run.cfg.model.image_size))
    row = {"sampler": sampler, "steps": steps, "guidance": guidance, "guide": guide, "seed": seed,
           "seconds": time.perf_counter() - start,
           **{k: m[k] for k in ("accuracy", "frechet_distance", "frechet_floor", "near_copy_fraction",
                                "near_copy_fraction_test", "classifier_test_accuracy")}}
    print(f"{sampler} {steps} steps, {guide} guidance {guidance:g}, seed {seed}: accuracy {row['accuracy']:.3f}  Fréchet "
          f"{row['frechet_distance']:.2f} (floor {row['frechet_floor']:.2f})  near-copies {row['near_copy_fraction']:.3f}",
          file=sys.stderr, flush=True)
    return row


def pick(rows: list[dict], min_accuracy: float = MIN_ACCURACY) -> dict:
    """Lowest Fréchet distance among rows with accuracy >= min_accuracy that copy training images no more often
    than the test split does; without such a row, the most accurate."""
    ok = [r for r in rows if r["accuracy"] >= min_accuracy and r["near_copy_fraction"] <= r["near_copy_fraction_test"]]
    return min(ok, key=lambda r: r["frechet_distance"]) if ok else max(rows, key=lambda r: r["accuracy"])


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in rows:
        ax.scatter(r["frechet_distance"], r["accuracy"], color="C0" if r["sampler"] == rows[0]["sampler"] else "C1")
        ax.annotate(f"{r['sampler']} {r['steps']}, {r.get('guide', 'cfg')} g={r['guidance']:g}",
                    (r["frechet_distance"], r["accuracy"]),
                    fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axvline(rows[0]["frechet_floor"], color="gray", ls=":", label="real-data floor")
    ax.set(xlabel="Fréchet distance (classifier features), lower is better", ylabel="conditional accuracy", title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    from difftrain.generation import cycled_labels, load_run

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="run directory or checkpoint")
    p.add_argument("--name", required=True, help="results go to bench/results/guidance-NAME.*")
    p.add_argument("--guidance", default="1,1.5,2,3")
    p.add_argument("--samplers", default="dpmpp-2m:20,ddim:20,dpmpp-2m:10",
                   help="SAMPLER:STEPS,...: the first is swept over --guidance, the others run at the picked guidance")
    p.add_argument("--guides", default="", help="autoguidance rows: the guides' weights, ema-0.9,checkpoints/step-N.pt,...")
    p.add_argument("--auto-guidance", default="1.5,2,3", help="the weights w of the autoguidance rows")
    p.add_argument("--seeds", default="0", help="sampling seeds, each row once per seed")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    run = load_run(args.run, device="cpu")
    labels = cycled_labels(args.n, run.cfg.model.num_classes)
    samplers = [(s.split(":")[0], int(s.split(":")[1])) for s in args.samplers.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    with torch.no_grad():
        rows = [cell(run, labels, *samplers[0], float(g), seed=seed) for g in args.guidance.split(",") for seed in seeds]
        rows += [cell(run, labels, *samplers[0], float(g), guide, seed) for guide in filter(None, args.guides.split(","))
                 for g in args.auto_guidance.split(",") for seed in seeds]
        chosen_guidance = pick(rows)["guidance"]
        rows += [cell(run, labels, s, steps, chosen_guidance, seed=seed) for s, steps in samplers[1:] for seed in seeds]
    results = {"machine": machine(), "run": str(args.run), "n": args.n, "rows": rows}
    report(results, args.name, Path(args.out) if args.out else None)


def report(results: dict, name: str, out: Path | None = None) -> None:
    """guidance-NAME.json, .md and .png from the measured rows (also: re-render a saved JSON with a new rule)."""
    rows, n = results["rows"], results["n"]
    best = results["picked"] = pick(rows)
    r0 = rows[0]
    md = [f"# Guidance and sampler trade-off: {name}", "",
          f"{results['machine']['cpu']}, {results['machine']['date']}. `bench/guidance_curve.py {results['run']} --name "
          f"{name}`: n={n} class-conditional samples of the EMA weights per row, classifier metric "
          f"(classifier test accuracy {r0['classifier_test_accuracy']:.4f}; real-data Fréchet floor "
          f"{r0['frechet_floor']:.2f} at n={n}; test images' near-copy rate {r0['near_copy_fraction_test']:.3f}).", "",
          f"Picked (lowest Fréchet among rows with accuracy >= {MIN_ACCURACY} and near-copies at most the test "
          f"split's): **{best['sampler']} {best['steps']} steps, {best.get('guide', 'cfg')} guidance "
          f"{best['guidance']:g}**.", ""]
    md += table(["sampler", "steps", "guide", "guidance", "seed", "accuracy", "Fréchet (floor)", "near-copies", "seconds"],
                [[r["sampler"], r["steps"], r.get("guide", "cfg"), f"{r['guidance']:g}", r.get("seed", 0),
                  f"{r['accuracy']:.3f}", f"{r['frechet_distance']:.2f} ({r['frechet_floor']:.2f})",
                  f"{r['near_copy_fraction']:.3f}", f"{r['seconds']:.0f}"] for r in rows])
    path = write_results(f"guidance-{name}", results, md, out)
    plot(rows, path.with_suffix(".png"), f"{name}: accuracy vs Fréchet distance (n={n})")

if __name__ == "__main__":
    main()
