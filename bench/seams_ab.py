"""Before/after check of a refactor: training and sampling speed of two source trees, side by side.

The seams redesign (issue #25) must not slow `Engine.train_step` or sampling. This script times the
`digits` recipe in two checkouts of difftrain (for example the commit before the redesign and today's),
each in a fresh worker process with that tree first on PYTHONPATH, taking turns in interleaved rounds so
that other load on the machine hits both alike:

- training: images/s of `--steps` calls of `Engine.train_step` after a warm-up (data, label dropout,
  timesteps, forward, backward, clipping, AdamW, EMA: the loop the redesign moved into its seams);
- sampling: images/s of `generate()` (the public call; today's builds a `SamplingPlan` per call), 128
  samples, DDIM 10 steps, guidance 3.

Ratios new / old are medians over the rounds. Build a tree of the old commit with
`git worktree add --detach /tmp/old COMMIT`.

    .venv/bin/python bench/seams_ab.py --old /tmp/old --new . --rounds 6 --steps 80 --threads 2 model.norm_groups=32

(`digits` moved from 32 to 24 GroupNorm groups in the same round of work, so both sides are given the old value.)

Writes bench/results/seams_ab.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, table, write_results  # noqa: E402

WORKER = r"""
import json, sys, tempfile, time
import torch
from difftrain.config import load_config
from difftrain.generation import generate
from difftrain.training import Engine

steps, warm = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(int(sys.argv[3]))
run = tempfile.mkdtemp()
engine = Engine(load_config("digits", [f"run_dir={run}", "train.progress=false", "train.tensorboard=false",
                                       *json.loads(sys.argv[4])]))
lr = engine.cfg.train.lr
for _ in range(warm):
    engine.train_step(lr)
start = time.perf_counter()
for _ in range(steps):
    engine.train_step(lr)
train_s = time.perf_counter() - start
model = engine.task.emas[0].model
labels = torch.arange(128) % 10
generate(model, engine.cfg, 16, labels=labels[:16], guidance=3.0, seed=0, sampler="ddim", steps=2)  # warm-up
start = time.perf_counter()
generate(model, engine.cfg, 128, labels=labels, guidance=3.0, seed=0, sampler="ddim", steps=10)
sample_s = time.perf_counter() - start
print(json.dumps({"train_images_s": steps * engine.cfg.train.batch_size / train_s, "sample_images_s": 128 / sample_s}))
"""


def measure(tree: Path, args) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{tree / 'src'}", "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run([sys.executable, "-c", WORKER, str(args.steps), str(args.warmup), str(args.threads),
                           json.dumps(args.overrides)],
                          capture_output=True, text=True, env=env, cwd=tree)
    if done.returncode != 0:
        raise SystemExit(f"worker on {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", type=Path, required=True, help="the checkout before the change")
    p.add_argument("--new", type=Path, default=Path("."), help="the checkout after it (default: this one)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("overrides", nargs="*", help="key=value overrides of the digits recipe for both trees (e.g. the "
                   "recipe values of the old tree where the recipe changed)")
    args = p.parse_args()
    rows: dict[str, list[dict]] = {"old": [], "new": []}
    for r in range(args.rounds):
        order = ("old", "new") if r % 2 == 0 else ("new", "old")  # alternate who goes first
        for side in order:
            rows[side].append(measure(getattr(args, side).resolve(), args))
            print(f"round {r} {side}: {rows[side][-1]}", file=sys.stderr, flush=True)
    med = {side: {k: statistics.median(m[k] for m in ms) for k in ("train_images_s", "sample_images_s")}
           for side, ms in rows.items()}
    ratio = {k: med["new"][k] / med["old"][k] for k in med["new"]}
    result = {"machine": machine(), "old": str(args.old), "new": str(args.new), "rounds": rows, "median": med,
              "ratio_new_over_old": ratio, "steps": args.steps, "threads": args.threads}
    m = result["machine"]
    md = [f"# Before/after speed of two trees ({m['cpu']}, {m['date']}, load average {m.get('load_average')})", "",
          f"`digits` recipe, {args.steps} train steps of batch 128 after {args.warmup} warm-up, then 128 samples "
          f"(DDIM 10 steps, guidance 3), {args.threads} thread(s), {args.rounds} interleaved rounds; medians. "
          f"Overrides on both sides: {' '.join(args.overrides) or 'none'}. Old tree: `{args.old}`.", "",
          *table(["measure", "old", "new", "new / old"],
                 [[k, f"{med['old'][k]:.1f}", f"{med['new'][k]:.1f}", f"{ratio[k]:.3f}"] for k in ratio])]
    write_results("seams_ab", result, md)


if __name__ == "__main__":
    main()
