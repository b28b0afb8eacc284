"""Sample quality per CPU-minute: `digits-dit-flow` (DiT + rectified flow) beside `digits` (UNet + DDPM).

Both recipes are trained in this one run, in stages (by default at 1/4, 1/2, 3/4 and all of
their steps; each stage resumes the previous one through `train.resume=auto`). After each stage
the EMA weights draw class-conditional samples with the recipe's own sampler and guidance, and
the offline digits metric (`difftrain.evaluation.digits`: a small CNN trained on the digits
train split) scores them: conditional accuracy (the classifier's label agrees with the asked
class) and the Fréchet distance of its features to the test split. The metric is a proxy
(no Inception network on 8x8 digits), with the real-data ceiling and floor printed beside it.

CPU time is the training subprocesses' user + system time (getrusage), which counts both
cores and is less sensitive than wall time to other work on a shared machine; wall time is
printed too. Final grids, checkpoints and stage restarts are included in both.

    .venv/bin/python bench/flow_vs_ddpm.py                      # full recipes, ~8 min on 2 idle cores
    .venv/bin/python bench/flow_vs_ddpm.py --scale 0.25 --n 200  # a quick look

Writes bench/results/flow_vs_ddpm.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("digits", "digits-dit-flow")


def children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def train_stage(recipe: str, run_dir: Path, steps: int, threads: int | None) -> tuple[float, float]:
    """Train `recipe` to `steps` in a subprocess; (CPU seconds, wall seconds) it took."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "difftrain", "train", recipe, f"run_dir={run_dir}", f"train.steps={steps}",
           "train.progress=false", "train.tensorboard=false", "train.sample_every=0", "train.checkpoint_every=0"]
    cpu, wall = children_cpu_s(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return children_cpu_s() - cpu, time.perf_counter() - wall


def evaluate(run_dir: Path, n: int) -> dict:
    from difftrain.evaluation.digits import digits_metrics
    from difftrain.generation import cycled_labels, generate, load_run

    run = load_run(run_dir)
    labels = cycled_labels(n, run.cfg.model.num_classes)
    cpu = time.process_time()
    images = generate(run.model, run.cfg, n, labels=labels, seed=1)
    sample_cpu = time.process_time() - cpu
    m = digits_metrics(images, labels)
    return {"accuracy": m["accuracy"], "frechet": m["frechet_distance"], "sample_cpu_s_per_100": 100 * sample_cpu / n,
            "ceiling_accuracy": m["classifier_test_accuracy"], "floor_frechet": m["frechet_floor"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", type=float, default=1.0, help="fraction of each recipe's train.steps (default 1)")
    p.add_argument("--stages", type=int, default=4, help="evaluation points per recipe")
    p.add_argument("--n", type=int, default=500, help="samples per evaluation (cycled over the 10 classes)")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for training (default: torch's)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "flow_vs_ddpm"))
    p.add_argument("--work", default=str(ROOT / "runs" / "bench-flow-vs-ddpm"))
    args = p.parse_args()

    from difftrain.config import load_config

    rows = []
    for recipe in RECIPES:
        total = max(1, round(load_config(recipe).train.steps * args.scale))
        run_dir = Path(args.work) / f"{recipe}-x{args.scale:g}"
        if run_dir.exists():
            raise SystemExit(f"{run_dir} exists; remove it or pass --work")
        cpu_s = wall_s = 0.0
        for k in range(1, args.stages + 1):
            steps = max(1, round(total * k / args.stages))
            c, w = train_stage(recipe, run_dir, steps, args.threads)
            cpu_s, wall_s = cpu_s + c, wall_s + w
            row = {"recipe": recipe, "steps": steps, "cpu_min": cpu_s / 60, "wall_min": wall_s / 60, **evaluate(run_dir, args.n)}
            rows.append(row)
            print(f"{recipe:16s} step {steps:5d}  cpu {row['cpu_min']:5.2f} min  wall {row['wall_min']:5.2f} min  "
                  f"accuracy {row['accuracy']:.3f}  Fréchet {row['frechet']:.3f}  "
                  f"sampling {row['sample_cpu_s_per_100']:.1f} cpu-s/100", flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"scale": args.scale, "n": args.n, "threads": args.threads or torch.get_num_threads(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "load_average_at_end": os.getloadavg()}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = ["| recipe | steps | CPU min | wall min | accuracy | Fréchet | sampling CPU s / 100 |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['recipe']} | {r['steps']} | {r['cpu_min']:.2f} | {r['wall_min']:.2f} | {r['accuracy']:.3f} | "
              f"{r['frechet']:.3f} | {r['sample_cpu_s_per_100']:.1f} |" for r in rows]
    lines.append(f"\nceiling accuracy (real test digits) {rows[0]['ceiling_accuracy']:.3f}; Fréchet floor (train vs test) "
                 f"{rows[0]['floor_frechet']:.3f}; {json.dumps(meta)}")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    # The side-by-side ratio at equal budgets: each recipe's final stage.
    last = {r["recipe"]: r for r in rows}
    a, b = last["digits-dit-flow"], last["digits"]
    print(f"\nfinal: flow/ddpm CPU-time ratio {a['cpu_min'] / b['cpu_min']:.2f}; accuracy {a['accuracy']:.3f} vs "
          f"{b['accuracy']:.3f}; Fréchet {a['frechet']:.3f} vs {b['frechet']:.3f}\nwrote {out}.json and {out}.md")


if __name__ == "__main__":
    main()
