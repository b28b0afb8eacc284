"""Sample quality per CPU-minute on real MNIST at 28x28: difftrain's UNet and DiT recipes beside two diffusers peers.

Run as `bench/quality_per_minute.py --data mnist` (this module holds that mode).

Sides, all trained in this one process, taking turns in slices of `--slice` seconds of training so
that whatever else the machine does hits them alike:

- difftrain, recipe `mnist` (ADM UNet + DDPM, v-prediction, cosine schedule): one run *per budget* in
  `--budgets` (minutes), each sized to its budget as `train.budget=Nm` sizes it (the lr schedule's
  decay ends when the budget does), through difftrain's `Engine.train_step`, scored at its end.
- difftrain, recipe `mnist-dit` (the best DiT recipe found): one run of the longest budget, scored
  halfway (mid-schedule, so it understates a run sized to that half) and at its end.
- diffusers, `UNetPeer` (UNet2DModel + DDPMScheduler, parameter count matched to the `mnist` UNet)
  and `DiTFlowPeer` (DiTTransformer2DModel + FlowMatchEulerDiscreteScheduler, the `mnist-dit`
  DiT's width, depth, heads and patch size), written as diffusers' examples write them
  (`bench/peers.py`), with the matching recipe's batch, lr, warm-up, betas and EMA rate, at a constant
  lr after the warm-up (the examples' schedulers are sized in steps, not in time). Each peer trains
  `--peer-factor` times the longest budget and is scored at every budget but the first, and at the end.

Scoring (outside the budgets): `--n` class-conditional samples of the EMA weights, each side with
the same number of network evaluations (`--steps` steps of DPM++ 2M for the DDPM sides, Euler for
the flow sides, classifier-free guidance `--guidance` batched as [x] * 2), through difftrain's
classifier-feature metric (`difftrain.evaluation.classifier`: conditional accuracy, Fréchet
distance in a small MNIST CNN's features with the real-data floor beside it, near-copies of
training images). Target (issue 16): accuracy >= 0.98 and Fréchet <= 2x the floor.

    .venv/bin/python bench/quality_per_minute.py --data mnist                 # 2.5/5/10 min vs 20 min, ~90 min
    .venv/bin/python bench/quality_per_minute.py --data mnist --quick         # 20/40 s, n=200: plumbing only

Writes bench/results/quality_per_minute-mnist{,-quick}.json, .md and .png.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import DifftrainSide, machine, matmul_gflops, n_params, setup_threads, table, write_results
from peers import DiTFlowPeer, UNetPeer, recipe_hparams

MNIST = "/work/shared/data/mnist"
UNET, DIT = "mnist", "mnist-dit"  # difftrain's best UNet and best DiT recipes


def ours_run(recipe: str, data_path: str, budget_s: float, run_dir: Path, seed: int = 0) -> DifftrainSide:
    """One difftrain run sized to `budget_s` seconds of training."""
    return DifftrainSide(recipe, [f"data.path={data_path}", f"train.seed={seed}"], run_dir, budget_s,
                         label=f"difftrain {recipe} ({budget_s / 60:.3g} min run)")


class PeerRun:
    def __init__(self, peer, label: str, budget_s: float):
        self.peer, self.label, self.budget_s, self.trained = peer, label, budget_s, 0.0
        self.cfg = peer.cfg

    def step(self) -> None:
        self.peer.step()

    @property
    def steps(self) -> int:
        return self.peer.steps

    def sample(self, labels: torch.Tensor, steps: int, guidance: float) -> torch.Tensor:
        return self.peer.sample(labels, steps, guidance)


def build_sides(args, tmp: Path) -> tuple[list, dict]:
    """difftrain's UNet recipe: one run per budget; its DiT recipe: one run of the longest budget, scored at
    its end and halfway; each peer: one run of peer-factor x the longest budget, scored at every budget from
    the second on and at the longest times the factor."""
    budgets = [b * 60 for b in args.budgets]
    longest, peer_budget = max(budgets), max(budgets) * args.peer_factor
    ours = [ours_run(UNET, args.data_path, b, tmp / f"{UNET}-{b:g}") for b in budgets]
    dit = ours_run(DIT, args.data_path, longest, tmp / f"{DIT}-{longest:g}")
    unet_cfg, dit_cfg = ours[0].cfg, dit.cfg
    unet_peer = UNetPeer(unet_cfg, n_params(ours[0].tr.task.model), recipe_hparams(unet_cfg), sampler="dpmpp")
    m = dit_cfg.model
    dit_peer = DiTFlowPeer(dit_cfg, m.hidden_size, m.depth, m.num_heads, m.patch_size, recipe_hparams(dit_cfg))
    peers = [PeerRun(unet_peer, "diffusers UNet2DModel + DDPMScheduler", peer_budget),
             PeerRun(dit_peer, "diffusers DiTTransformer2DModel + FlowMatchEuler", peer_budget)]
    peer_points = sorted({*budgets[1:], peer_budget} if len(budgets) > 1 else {*budgets, peer_budget})
    evals = {id(s): [s.budget_s] for s in ours} | {id(dit): [longest / 2, longest]}
    evals |= {id(s): peer_points for s in peers}
    params = {f"difftrain {UNET}": n_params(ours[0].tr.task.model), f"difftrain {DIT}": n_params(dit.tr.task.model),
              peers[0].label: n_params(unet_peer.unet), peers[1].label: n_params(dit_peer.dit)}
    return [*ours, dit, *peers], {"evals": evals, "params": params}


def score(side, args) -> dict:
    from difftrain.evaluation.classifier import classifier_metrics, load_reference
    from difftrain.generation import cycled_labels

    labels = cycled_labels(args.n, 10)
    start = time.perf_counter()
    with torch.random.fork_rng():
        images = side.sample(labels, args.steps, args.guidance)
    m = classifier_metrics(images, labels, load_reference(side.cfg.data, side.cfg.model.image_size))
    keys = ("accuracy", "frechet_distance", "frechet_floor", "classifier_test_accuracy", "near_copy_fraction",
            "near_copy_fraction_test")
    return {k: m[k] for k in keys} | {"eval_s": time.perf_counter() - start}


def train_all(sides: list, evals: dict, args) -> list[dict]:
    rows, pending = [], {id(s): list(evals[id(s)]) for s in sides}
    while any(pending[id(s)] for s in sides):
        for side in sides:
            if not pending[id(side)]:
                continue
            stop = min(side.trained + args.slice, pending[id(side)][0])
            wall = time.perf_counter()
            while side.trained + (time.perf_counter() - wall) < stop:
                side.step()
            side.trained += time.perf_counter() - wall
            if side.trained >= pending[id(side)][0]:
                pending[id(side)].pop(0)
                row = {"side": side.label, "train_s": side.trained, "steps": side.steps,
                       "images": side.steps * side.cfg.train.batch_size, **score(side, args)}
                rows.append(row)
                if args.keep and isinstance(side, DifftrainSide) and not pending[id(side)]:
                    row["checkpoint"] = str(side.tr.save())  # for `difftrain eval` sweeps afterwards
                print(f"{side.label:55s} {row['train_s'] / 60:5.1f} min {row['steps']:5d} steps  accuracy "
                      f"{row['accuracy']:.3f}  Fréchet {row['frechet_distance']:.2f} (floor {row['frechet_floor']:.2f})"
                      f"  eval {row['eval_s']:.0f} s", file=sys.stderr, flush=True)
    return rows


def meets(row: dict, args) -> bool:
    return row["accuracy"] >= args.accuracy and row["frechet_distance"] <= args.floor_factor * row["frechet_floor"]


def summarise(rows: list[dict], args) -> dict:
    """First training time at which each side meets the target; difftrain's per-budget runs count as one side."""
    first: dict[str, float | None] = {}
    for r in sorted(rows, key=lambda r: r["train_s"]):
        name = r["side"].split(" (")[0]
        first.setdefault(name, None)
        if first[name] is None and meets(r, args):
            first[name] = r["train_s"]
    return first


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_fd, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for name in dict.fromkeys(r["side"].split(" (")[0] for r in rows):
        mine = sorted((r for r in rows if r["side"].split(" (")[0] == name), key=lambda r: r["train_s"])
        minutes = [r["train_s"] / 60 for r in mine]
        ax_fd.plot(minutes, [r["frechet_distance"] for r in mine], "o-", label=name)
        ax_acc.plot(minutes, [r["accuracy"] for r in mine], "o-", label=name)
    floor = rows[0]["frechet_floor"]
    ax_fd.axhline(floor, color="gray", ls=":", label=f"real-data floor {floor:.2f}")
    ax_fd.axhline(2 * floor, color="gray", ls="--", label="target: 2x floor")
    ax_acc.axhline(0.98, color="gray", ls="--", label="target 0.98")
    ticks = sorted({round(r["train_s"] / 60, 2) for r in rows})
    ax_fd.set(yscale="log", xticks=ticks, xlabel="CPU training minutes (2 cores)",
              ylabel="Fréchet distance (classifier features)")
    ax_acc.set(xticks=ticks, xlabel="CPU training minutes (2 cores)", ylabel="conditional accuracy", ylim=(0.5, 1.0))
    ax_fd.legend(fontsize=7)
    ax_acc.legend(fontsize=7)
    fig.suptitle("MNIST 28x28, class-conditional: quality per CPU-minute")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(results: dict, args) -> list[str]:
    m, rows = results["machine"], results["rows"]
    floor = rows[0]["frechet_floor"]
    md = ["# Sample quality per CPU-minute on MNIST 28x28: difftrain vs diffusers", "",
          f"{m['cpu']}, {m['threads']} threads, torch {m['torch']}, diffusers {m['diffusers']}, {m['date']}, fp32 "
          f"matmul peak {results['peak_gflops']:.0f} GFLOP/s at the start. `bench/quality_per_minute.py --data mnist`"
          f"{' --quick' if args.quick else ''}: all sides trained in this one process in alternating {args.slice:g} s "
          f"slices; each score draws n={args.n} samples of the EMA weights ({args.steps} network evaluations x 2 "
          f"for guidance {args.guidance:g}) scored by the MNIST classifier metric (classifier test accuracy "
          f"{rows[0]['classifier_test_accuracy']:.4f}; real-data Fréchet floor {floor:.2f} at n={args.n}).", "",
          f"Budgets: difftrain `{UNET}` one run per budget of {', '.join(f'{b:g}' for b in args.budgets)} min; "
          f"`{DIT}` one run of {max(args.budgets):g} min (scored halfway and at the end); each peer one run of "
          f"{max(args.budgets) * args.peer_factor:g} min at a constant lr after warm-up.", "",
          "Parameters: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in results["params"].items()) + ".", "",
          f"Target: accuracy >= {args.accuracy} and Fréchet <= {args.floor_factor:g}x floor "
          f"(<= {args.floor_factor * floor:.2f}). First training time meeting it:", ""]
    md += [f"- {k}: {'not within the budgets' if v is None else f'{v / 60:.1f} min'}" for k, v in results["first"].items()]
    md += ["", *table(["side", "training min", "steps", "images", "accuracy", "Fréchet", "x floor", "near-copies"],
                      [[r["side"], f"{r['train_s'] / 60:.1f}", r["steps"], r["images"], f"{r['accuracy']:.3f}",
                        f"{r['frechet_distance']:.2f}", f"{r['frechet_distance'] / r['frechet_floor']:.1f}",
                        f"{r['near_copy_fraction']:.3f} (test {r['near_copy_fraction_test']:.3f})"]
                       for r in sorted(rows, key=lambda r: (r["side"].split(" (")[0], r["train_s"]))])]
    md += ["", f"Load average at the end: {', '.join(f'{x:.2f}' for x in m['load_average'])}."]
    return md


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="mnist")
    p.add_argument("--data-path", default=MNIST, help="folder of the four MNIST IDX files")
    p.add_argument("--budgets", type=lambda s: [float(x) for x in s.split(",")], default=[2.5, 5.0, 10.0],
                   help="difftrain's budgets in minutes (one run each)")
    p.add_argument("--peer-factor", type=float, default=2.0, help="the peers train this many times the longest budget")
    p.add_argument("--slice", type=float, default=10.0, help="training seconds per turn")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--steps", type=int, default=20, help="network evaluations per sample (before guidance's x2)")
    p.add_argument("--guidance", type=float, default=None, help="default: the mnist recipe's")
    p.add_argument("--accuracy", type=float, default=0.98)
    p.add_argument("--floor-factor", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="budgets 20 and 40 s, n=200: checks the plumbing")
    p.add_argument("--keep", default=None, help="keep difftrain's run directories (a checkpoint at each end) here")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.budgets, args.n = [1 / 3, 2 / 3], 200
    setup_threads(args.threads)
    peak = matmul_gflops()
    with tempfile.TemporaryDirectory() as tmp:
        sides, info = build_sides(args, Path(args.keep or tmp))
        if args.guidance is None:
            args.guidance = sides[0].cfg.sample.guidance
        score(sides[0], argparse.Namespace(**{**vars(args), "n": 2}))  # trains and caches the classifier if missing
        rows = train_all(sides, info["evals"], args)
    results = {"machine": machine(), "peak_gflops": peak, "args": {k: v for k, v in vars(args).items()},
               "params": info["params"], "rows": rows, "first": summarise(rows, args)}
    name = "quality_per_minute-mnist" + ("-quick" if args.quick else "")
    out = write_results(name, results, markdown(results, args), Path(args.out) if args.out else None)
    plot(rows, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
