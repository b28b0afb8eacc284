"""Convergence options measured: each alone and the best combination against today's recipe, same budget, same seeds.

Every arm is a real `difftrain train RECIPE ...` run with the same image budget and seed (so the same
number of optimizer steps; the options change the loss, not the cost of a step), scored by
`difftrain eval RUN --n N` with the classifier-feature metric (conditional accuracy, Fréchet distance
in the classifier's features, the real-data floor beside it). Arms:

    baseline            the recipe as shipped
    edm                 diffusion.process=edm (Karras et al. 2022 preconditioning, log-normal sigmas, EDM weighting)
    edm_data_std        the same with diffusion.sigma_data set to the data's std in [-1, 1] (EDM's 0.5 is for
                        its data sets; digits have 0.75, MNIST 0.62)
    edm_high_noise      mnist only, a diagnosis: edm_data_std with diffusion.p_mean=0 (median training sigma 1
                        instead of 0.3), to test whether EDM loses there because it rarely trains at high noise
    min_snr             diffusion.loss_weighting=min_snr diffusion.snr_gamma=5 (Hang et al. 2023)
    offset_noise        diffusion.offset_noise=0.1
    zero_terminal_snr   diffusion.zero_terminal_snr=true, v-prediction, trailing spacing (Lin et al. 2024)
    v_cosine            digits only: diffusion.prediction=v diffusion.schedule=cosine (what the `mnist` recipe uses)
    eps_linear          mnist only: diffusion.prediction=eps diffusion.schedule=linear (what `mnist` moved away from)
    dit_adaln           mnist-dit only: the class enters through adaLN (added to the timestep embedding, as
                        diffusers' DiTTransformer2DModel does) instead of as an extra token
    dit_plain_data      mnist-dit only: the images in [-1, 1] with no black and white images added, as
                        diffusers' DiT example trains (the recipe: unit variance, 1000 black + 1000 white)
    qk_norm_off         digits-dit only: model.qk_norm=false, the digits-dit-flow recipe before qk-norm (needed to
                        export a RoPE DiT to diffusers' FluxTransformer2DModel) was put in it
    phema               train.posthoc_ema=[0.05,0.1]: the same training as baseline; scored at the best of
                        sigma_rel 0.05 / 0.1 / 0.2 reconstructed by `difftrain ema` (EDM2, Karras et al. 2024).
                        Picking the best width on the scored samples favours this arm slightly.
    best                the arms whose mean Fréchet distance beat baseline's by more than both runs' seed
                        spread, combined (edm replaces the DDPM-only options when it wins)

A difference smaller than the spread between seeds is reported as a tie.

    .venv/bin/python bench/convergence.py --data digits --jobs 2         # 350 steps of batch 128, 2 seeds, n=1000 (~25 min)
    .venv/bin/python bench/convergence.py --data mnist --steps 10 --jobs 2   # 24k images of batch 32, 2 seeds, n=1000 (~50 min)
    .venv/bin/python bench/convergence.py --data mnist-dit --jobs 2       # mnist-dit vs adaLN, vs plain data (~25 min)
    .venv/bin/python bench/convergence.py --data digits-dit --jobs 2     # digits-dit-flow with vs without qk-norm
    .venv/bin/python bench/convergence.py --data digits --quick          # plumbing: 40 steps, 1 seed, n=200

`--merge` adds the arms it runs to the saved results of the same data set, budget, seeds and n
(replacing those arms' old rows), so one more arm does not mean running them all again.

`--jobs 2` runs two arms side by side, each subprocess at (cores / jobs) torch threads: on 2 cores
that keeps both busy through the single-threaded parts of a run. Scores do not depend on it (the
budget is an image count); the train seconds do.

Writes bench/results/convergence-DATA.json, .md and .png, and rewrites bench/results/convergence.md,
the summary of every data set measured so far.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import RESULTS, ROOT, machine, table, write_results

DIFFTRAIN = str(Path(sys.executable).with_name("difftrain"))
ARMS = {
    "baseline": [],
    "edm": ["diffusion.process=edm"],
    "edm_data_std": ["diffusion.process=edm", "diffusion.sigma_data={sigma_data}"],
    "edm_high_noise": ["diffusion.process=edm", "diffusion.sigma_data={sigma_data}", "diffusion.p_mean=0"],
    "min_snr": ["diffusion.loss_weighting=min_snr", "diffusion.snr_gamma=5"],
    "offset_noise": ["diffusion.offset_noise=0.1"],
    "zero_terminal_snr": ["diffusion.zero_terminal_snr=true", "diffusion.prediction=v", "sample.spacing=trailing"],
    "phema": ["train.posthoc_ema=[0.05,0.1]"],
    "dit_adaln": ["model.class_embed=adaln"],
    "dit_plain_data": ["data.normalize=none", "data.black_white=0"],
    "qk_norm_off": ["model.qk_norm=false"],  # digits-dit-flow before qk_norm=true (for export) was put in the recipe
    # the parameterisation the `mnist` recipe moved to, tried on digits; and on MNIST the one it left
    "v_cosine": ["diffusion.prediction=v", "diffusion.schedule=cosine"],
    "eps_linear": ["diffusion.prediction=eps", "diffusion.schedule=linear"],
}
DIT_ARMS = ("dit_adaln", "dit_plain_data", "qk_norm_off")
DATA_ARMS = {"digits": [a for a in ARMS if a not in ("eps_linear", "edm_high_noise", *DIT_ARMS)],
             "mnist": [a for a in ARMS if a not in ("v_cosine", *DIT_ARMS)],
             "mnist-dit": ["baseline", "dit_adaln", "dit_plain_data"],
             "digits-dit": ["baseline", "qk_norm_off"]}
# std of the training images as the recipe scales them
SIGMA_DATA = {"digits": 0.75, "mnist": 0.62, "mnist-dit": 1.0, "digits-dit": 1.0}
EDM_ARMS = ("edm", "edm_data_std", "edm_high_noise")
DDPM_ONLY = ("min_snr", "offset_noise", "zero_terminal_snr", "v_cosine", "eps_linear")
SIGMA_RELS = "0.05,0.1,0.2"
DATA = {  # recipe, image budget, extra overrides
    "digits": ("digits", 350 * 128, []),
    "mnist": ("mnist", 24_000, ["data.path=/work/shared/data/mnist"]),
    "mnist-dit": ("mnist-dit", 36_000, ["data.path=/work/shared/data/mnist"]),
    "digits-dit": ("digits-dit-flow", 900 * 128, []),
}
QUIET = ["train.progress=false", "train.tensorboard=false", "train.sample_every=0", "train.checkpoint_every=100000"]


def run(cmd: list[str], threads: int) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")


def train_and_score(arm: str, overrides: list[str], seed: int, args, tmp: Path) -> dict:
    recipe, images, extra = DATA[args.data]
    run_dir = tmp / f"{arm}-{seed}"
    start = time.perf_counter()
    run([DIFFTRAIN, "train", recipe, f"run_dir={run_dir}", f"train.seed={seed}", f"train.budget={images}_images",
         *QUIET, *extra, *overrides], args.threads)
    train_s = time.perf_counter() - start
    out = run_dir / "score.json"
    sampling = ["--steps", str(args.steps)] if args.steps else []
    if any(o.startswith("train.posthoc_ema=") for o in overrides):
        run([DIFFTRAIN, "ema", str(run_dir), "--sigma-rel", SIGMA_RELS, "--score", "--n", str(args.n), "--quiet",
             "--json", str(out), *sampling], args.threads)
        rows = json.loads(out.read_text())
        best = min(rows, key=lambda r: r["frechet_distance"])
        result = {**best, "phema_widths": {r["sigma_rel"]: r["frechet_distance"] for r in rows}}
    else:
        run([DIFFTRAIN, "eval", str(run_dir), "--n", str(args.n), "--quiet", "--json", str(out), *sampling],
            args.threads)
        result = json.loads(out.read_text())
    row = {"arm": arm, "seed": seed, "train_s": train_s, "overrides": overrides, "accuracy": result["accuracy"],
           "frechet_distance": result["frechet_distance"], "frechet_floor": result["frechet_floor"],
           "near_copy_fraction": result.get("near_copy_fraction")}
    if "phema_widths" in result:
        row["phema_widths"], row["sigma_rel"] = result["phema_widths"], result["sigma_rel"]
    print(f"{arm:18s} seed {seed}  accuracy {row['accuracy']:.3f}  Fréchet {row['frechet_distance']:.2f} "
          f"(floor {row['frechet_floor']:.2f})  train {train_s:.0f} s", file=sys.stderr, flush=True)
    return row


def summary(rows: list[dict]) -> dict[str, dict]:
    by_arm: dict[str, dict] = {}
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = [r for r in rows if r["arm"] == arm]
        fd = [r["frechet_distance"] for r in mine]
        by_arm[arm] = {"fd_mean": statistics.mean(fd), "fd_spread": max(fd) - min(fd),
                       "acc_mean": statistics.mean(r["accuracy"] for r in mine), "seeds": len(mine),
                       "train_s_mean": statistics.mean(r["train_s"] for r in mine)}
    base = by_arm.get("baseline")
    for s in by_arm.values():
        if base:
            gap = base["fd_mean"] - s["fd_mean"]
            s["vs_baseline"] = gap / base["fd_mean"]
            s["verdict"] = ("win" if gap > max(base["fd_spread"], s["fd_spread"]) else
                            "loss" if -gap > max(base["fd_spread"], s["fd_spread"]) else "tie")
    return by_arm


def best_combination(by_arm: dict[str, dict]) -> list[str]:
    """The winning arms that go together: the best EDM arm replaces the DDPM-only options when one wins."""
    winners = [a for a in ARMS if a != "baseline" and by_arm.get(a, {}).get("verdict") == "win"]
    edm = [a for a in winners if a in EDM_ARMS]
    if edm:
        best_edm = min(edm, key=lambda a: by_arm[a]["fd_mean"])
        winners = [a for a in winners if a not in DDPM_ONLY and (a not in EDM_ARMS or a == best_edm)]
    return winners


def overrides_of(arm: str, data: str) -> list[str]:
    return [o.format(sigma_data=SIGMA_DATA[data]) for o in ARMS[arm]]


def merged(rows: list[dict], args) -> list[dict]:
    """The saved rows of this data set (same budget, seeds and n) with the arms just run replaced."""
    path = RESULTS / f"convergence-{args.data}.json"
    if not path.exists():
        raise SystemExit(f"--merge: {path} does not exist; run without --merge first")
    old = json.loads(path.read_text())
    mine = {"budget_images": DATA[args.data][1], "seeds": args.seeds, "n": args.n}
    theirs = {k: old.get(k) for k in mine}
    if theirs != mine:
        raise SystemExit(f"--merge: {path} was measured with {theirs}, this run with {mine}; they cannot be compared")
    rerun = {r["arm"] for r in rows} | {"best"}  # the combination is recomputed from the merged table
    return [r for r in old["rows"] if r["arm"] not in rerun] + rows


def plot(rows: list[dict], by_arm: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    arms = list(by_arm)
    for i, arm in enumerate(arms):
        mine = [r for r in rows if r["arm"] == arm]
        ax.scatter([r["frechet_distance"] for r in mine], [r["accuracy"] for r in mine], label=arm, color=f"C{i}")
    ax.axvline(rows[0]["frechet_floor"], color="gray", ls=":", label="real-data floor")
    ax.set(xscale="log", xlabel="Fréchet distance (classifier features), lower is better",
           ylabel="conditional accuracy", title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(results: dict, args) -> list[str]:
    m, by_arm, rows = results["machine"], results["summary"], results["rows"]
    recipe, images, _ = DATA[args.data]
    md = [f"# Convergence options on `{args.data}`: each alone and combined, against the `{recipe}` recipe", "",
          f"{m['cpu']}, {results['jobs']} run(s) side by side at {results['threads']} torch thread(s) each, "
          f"torch {m['torch']}, {m['date']}. `bench/convergence.py --data "
          f"{args.data}`{' --quick' if args.quick else ''}: every arm trains the `{recipe}` recipe with "
          f"train.budget={images}_images (the same optimizer steps) for seeds {', '.join(map(str, args.seeds))}, then "
          f"`difftrain eval --n {args.n}{f' --steps {args.steps}' if args.steps else ''}` scores its EMA weights "
          f"with the classifier-feature metric (real-data "
          f"Fréchet floor {rows[0]['frechet_floor']:.2f} at n={args.n}). A difference in mean Fréchet distance "
          "smaller than the larger of the two arms' seed spreads is a **tie**."
          + (f" Arms {', '.join(results['merged'])} were run later and merged in (`--merge`), same budget, seeds "
             "and n." if results.get("merged") else ""), "",
          f"Best combination: {' + '.join(results['best']) or 'none (no option won)'}.", ""]
    md += table(["arm", "accuracy (mean)", "Fréchet (mean)", "seed spread", "vs baseline", "verdict", "train s"],
                [[a, f"{s['acc_mean']:.3f}", f"{s['fd_mean']:.2f}", f"{s['fd_spread']:.2f}",
                  f"{-100 * s.get('vs_baseline', 0):+.0f}%", s.get("verdict", ""), f"{s['train_s_mean']:.0f}"]
                 for a, s in by_arm.items()])
    md += ["", "Per run:", ""]
    md += table(["arm", "seed", "accuracy", "Fréchet", "near-copies", "note"],
                [[r["arm"], r["seed"], f"{r['accuracy']:.3f}", f"{r['frechet_distance']:.2f}",
                  f"{r['near_copy_fraction']:.3f}" if r.get("near_copy_fraction") is not None else "",
                  (f"sigma_rel {r['sigma_rel']:g} of " + ", ".join(f"{k}: {v:.2f}" for k, v in r["phema_widths"].items()))
                  if "phema_widths" in r else ""] for r in rows])
    md += ["", f"Load average at the end: {', '.join(f'{x:.2f}' for x in m['load_average'])} "
               "(scores do not depend on load: the budget is an image count)."]
    return md


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", choices=list(DATA), default="digits")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1])
    p.add_argument("--arms", default=None, help="comma-separated, from " + ", ".join(ARMS) + " (default: the data set's)")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--steps", type=int, default=0, help="sampler steps when scoring (default: the recipe's)")
    p.add_argument("--jobs", type=int, default=1, help="arms trained side by side, at cores / jobs threads each")
    p.add_argument("--images", type=int, default=None, help="image budget per run (default: the data set's)")
    p.add_argument("--merge", action="store_true", help="add these arms to the saved results of the data set")
    p.add_argument("--quick", action="store_true", help="40 steps, seed 0, n=200: checks the plumbing")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    recipe, images, extra = DATA[args.data]
    if args.quick:
        images, args.seeds, args.n = 40 * 128, [0], 200
    DATA[args.data] = (recipe, args.images or images, extra)
    args.threads = max(1, (os.cpu_count() or 1) // args.jobs)
    arms = args.arms.split(",") if args.arms else DATA_ARMS[args.data]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"unknown arm(s) {unknown}; choose from {', '.join(ARMS)}")
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.jobs) as pool:
        def measure(runs: list[tuple[str, list[str], int]]) -> list[dict]:
            return list(pool.map(lambda r: train_and_score(*r, args, Path(tmp)), runs))

        rows = measure([(arm, overrides_of(arm, args.data), seed) for arm in arms for seed in args.seeds])
        if args.merge:
            rows = merged(rows, args)
        by_arm = summary(rows)
        best = best_combination(by_arm)
        if len(best) > 1:  # one winner alone is already measured
            combined = [o for a in best for o in overrides_of(a, args.data)]
            rows += measure([("best", combined, seed) for seed in args.seeds])
            by_arm = summary(rows)
    results = {"machine": machine(), "jobs": args.jobs, "threads": args.threads, "data": args.data,
               "budget_images": DATA[args.data][1], "seeds": args.seeds,
               "n": args.n, "rows": rows, "summary": by_arm, "best": best, "merged": arms if args.merge else []}
    name = f"convergence-{args.data}" + ("-quick" if args.quick else "")
    out = write_results(name, results, markdown(results, args), Path(args.out) if args.out else None)
    plot(rows, by_arm, out.with_suffix(".png"), f"{args.data}: convergence options at a fixed image budget")
    if not args.quick and not args.out:
        (RESULTS / "convergence.md").write_text("\n".join(overview()) + "\n")


def overview() -> list[str]:
    """bench/results/convergence.md: one summary table per data set measured, with links to the details."""
    md = ["# Convergence options, measured", "",
          "Each option alone against the shipped recipe at the same image budget and seeds, scored at n >= 1000 "
          "by `bench/convergence.py`. A difference smaller than the seed spread is a tie. Details and plots: "
          "the linked files.", ""]
    for path in sorted(RESULTS.glob("convergence-*.json")):
        if path.stem.endswith("-quick"):
            continue
        res = json.loads(path.read_text())
        by_arm, rows = res["summary"], res["rows"]
        md += [f"## `{res['data']}`: {res['budget_images']} images per run, seeds {res['seeds']}, n={res['n']} "
               f"(floor {rows[0]['frechet_floor']:.2f})", "",
               f"[{path.stem}.md]({path.stem}.md), ![{res['data']}]({path.stem}.png)", ""]
        md += table(["arm", "accuracy", "Fréchet", "seed spread", "vs baseline", "verdict"],
                    [[a, f"{s['acc_mean']:.3f}", f"{s['fd_mean']:.2f}", f"{s['fd_spread']:.2f}",
                      f"{-100 * s.get('vs_baseline', 0):+.0f}%", s.get("verdict", "")] for a, s in by_arm.items()])
        md += ["", f"Best combination: {' + '.join(res['best']) or 'none (no option won)'}.", ""]
    return md


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "bench"))
    main()
