"""Sample quality per minute of CPU training: the `digits` recipe beside a peer written with diffusers.

difftrain: the `digits` recipe (ADM UNet, DDPM, label dropout, EMA), trained by `Engine.train_step`
with the recipe's lr schedule. The peer follows diffusers' `train_unconditional.py` example loop,
made class-conditional: `UNet2DModel` (parameter count closest to ours, `num_class_embeds` = 10
classes + a null class), `DDPMScheduler.add_noise`, MSE on the noise, AdamW, `get_scheduler`, gradient
clipping and `EMAModel`, labels dropped to the null class with the recipe's probability. Both see
the digits train split at 8x8 (UNet2DModel needs sizes divisible by 2^(levels-1) = 2 here, so no
padding or upscaling). `--peer-hparams recipe` (default) gives the peer our recipe's batch, lr,
warm-up, betas, weight decay and EMA rate, so the two differ by their code only; `example` uses the
example script's defaults (batch 16, lr 1e-4, betas (0.95, 0.999), weight decay 1e-6, 500 warm-up
steps, EMA up to 0.9999) at its constant-with-warm-up schedule.

The two take turns in slices of `--slice` seconds of training (so load on a shared machine hits
both alike); every `--eval-every` seconds of a side's own training time its EMA weights draw `--n`
class-conditional samples (DDIM 50 steps, guidance 3, trailing spacing: the recipe's sampler, and
diffusers' DDIMScheduler for the peer) that the offline digits metric scores (conditional accuracy,
Fréchet distance; `difftrain.evaluation.digits`). Sampling and scoring are outside the budget.
difftrain trains for `--budget` seconds, the peer for `--peer-factor` times that. Reported: the
time each first reaches `--target` accuracy, and their ratio. The peer lives in `bench/peers.py`.

`--data mnist` runs the real-MNIST comparison instead: difftrain's UNet and DiT recipes beside two
diffusers peers, at n=1000 (`bench/quality_mnist.py` documents it).

    .venv/bin/python bench/quality_per_minute.py            # 180 s vs 360 s of training, ~12 min on 2 idle cores
    .venv/bin/python bench/quality_per_minute.py --quick    # 30 s vs 60 s, n=100

Writes bench/results/quality_per_minute.json and .md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DifftrainSide, machine, n_params, setup_threads, table, write_results  # noqa: E402
from peers import EXAMPLE_HPARAMS, UNetPeer  # noqa: E402

PEER_HPARAMS = {"recipe": None, "example": EXAMPLE_HPARAMS}  # ours: the digits recipe's train.* values


def evaluate(side, n: int) -> dict:
    from difftrain.evaluation.digits import digits_metrics
    from difftrain.generation import cycled_labels

    labels = cycled_labels(n, 10)
    start = time.perf_counter()
    with torch.random.fork_rng():
        images = side.sample(labels, side.cfg.sample.steps, side.cfg.sample.guidance)
    m = digits_metrics(images, labels)
    return {"accuracy": m["accuracy"], "frechet_distance": m["frechet_distance"], "frechet_floor": m["frechet_floor"],
            "classifier_test_accuracy": m["classifier_test_accuracy"], "eval_s": time.perf_counter() - start}


def main() -> None:
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--data", choices=("digits", "mnist"), default="digits")
    known, rest = first.parse_known_args()
    if known.data == "mnist":
        from quality_mnist import main as mnist_main

        return mnist_main(sys.argv[1:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", choices=("digits", "mnist"), default="digits",
                   help="mnist: real MNIST at 28x28, four sides (bench/quality_mnist.py; see its --help)")
    p.add_argument("--recipe", default="digits")
    p.add_argument("--budget", type=float, default=180.0, help="difftrain's training seconds")
    p.add_argument("--peer-factor", type=float, default=2.0, help="the peer trains this many times as long")
    p.add_argument("--eval-every", type=float, default=30.0, help="training seconds between evaluations")
    p.add_argument("--slice", type=float, default=5.0, help="training seconds per turn")
    p.add_argument("--n", type=int, default=200, help="samples per evaluation (cycling through the classes)")
    p.add_argument("--target", type=float, default=0.95, help="conditional accuracy to reach")
    p.add_argument("--peer-hparams", choices=list(PEER_HPARAMS), default="recipe")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--quick", action="store_true", help="30 s vs 60 s of training, evaluations every 15 s, n=100")
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    args = p.parse_args()
    if args.quick:
        args.budget, args.eval_every, args.n = 30.0, 15.0, 100
    setup_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        ours = DifftrainSide(args.recipe, [], Path(tmp) / "ours", sample_batch=0)
        peer = UNetPeer(ours.cfg, n_params(ours.tr.task.model), PEER_HPARAMS[args.peer_hparams], sampler="ddim")
        sides = {"difftrain": ours, "diffusers": peer}
        budget = {"difftrain": args.budget, "diffusers": args.budget * args.peer_factor}
        trained = {k: 0.0 for k in sides}
        cpu = {k: 0.0 for k in sides}
        next_eval = {k: args.eval_every for k in sides}
        curves = {k: [] for k in sides}
        evaluate(ours, 2)  # the digits classifier is trained and cached here if missing, outside any budget
        while any(trained[k] < budget[k] for k in sides):
            for name, side in sides.items():
                if trained[name] >= budget[name]:
                    continue
                stop = min(trained[name] + args.slice, next_eval[name], budget[name])
                wall, c = time.perf_counter(), time.process_time()
                while trained[name] + (time.perf_counter() - wall) < stop:
                    side.step()
                trained[name] += time.perf_counter() - wall
                cpu[name] += time.process_time() - c
                if trained[name] >= next_eval[name] or trained[name] >= budget[name]:
                    row = {"train_s": trained[name], "cpu_s": cpu[name], "steps": side.steps, **evaluate(side, args.n)}
                    curves[name].append(row)
                    next_eval[name] += args.eval_every
                    print(f"{name:10s} {row['train_s']:6.1f} s {row['steps']:5d} steps  accuracy {row['accuracy']:.3f}  "
                          f"Fréchet {row['frechet_distance']:.2f}  (eval {row['eval_s']:.1f} s)", file=sys.stderr)

    def first(name):
        return next((r["train_s"] for r in curves[name] if r["accuracy"] >= args.target), None)

    reach = {k: first(k) for k in sides}
    ratio = reach["diffusers"] / reach["difftrain"] if reach["difftrain"] and reach["diffusers"] else None
    params = {"difftrain": n_params(ours.tr.task.model), "diffusers": n_params(peer.unet)}
    results = {"machine": machine(), "recipe": args.recipe, "budget_s": budget, "eval_every_s": args.eval_every,
               "n": args.n, "target": args.target, "quick": args.quick, "params": params,
               "peer_hparams": {"name": args.peer_hparams, **peer.hparams},
               "batch_size": {"difftrain": ours.cfg.train.batch_size, "diffusers": peer.batch_size},
               "time_to_target_s": reach, "ratio": ratio,
               "peer_reached_within": None if reach["difftrain"] is None else
               (reach["diffusers"] is not None and reach["diffusers"] <= args.peer_factor * reach["difftrain"]),
               "curves": curves}

    def fmt(s):
        return "not reached" if s is None else f"{s:.0f} s"

    floor = curves["difftrain"][-1]["frechet_floor"] if curves["difftrain"] else float("nan")
    md = [f"# Sample quality per minute of CPU training: `{args.recipe}` vs a diffusers peer", "",
          f"{results['machine']['cpu']}, {results['machine']['threads']} threads, torch {torch.__version__}, "
          f"diffusers {results['machine']['diffusers']}, {results['machine']['date']}. difftrain: adm_unet "
          f"{params['difftrain'] / 1e6:.2f}M, batch {ours.cfg.train.batch_size}. Peer: UNet2DModel "
          f"{params['diffusers'] / 1e6:.2f}M + DDPMScheduler in the train_unconditional loop, class-conditional, "
          f"hyper-parameters `{args.peer_hparams}` (batch {peer.batch_size}, lr {peer.hparams['lr']:g}). Both at 8x8, "
          f"trained in alternating {args.slice:g} s slices; every {args.eval_every:g} s of training the EMA weights "
          f"draw {args.n} samples (DDIM 50 steps, guidance 3) scored by the digits metric (classifier test accuracy "
          f"{curves['difftrain'][-1]['classifier_test_accuracy']:.3f}, Fréchet floor {floor:.2f}). "
          f"`bench/quality_per_minute.py`.", "",
          f"Time to {args.target:.0%} conditional accuracy: difftrain {fmt(reach['difftrain'])}, diffusers "
          f"{fmt(reach['diffusers'])} (of {budget['diffusers']:.0f} s)"
          + (f"; ratio **{ratio:.2f}x**." if ratio else "."), ""]
    body = []
    for name, rows in curves.items():
        for r in rows:
            body.append([name, f"{r['train_s']:.0f}", r["steps"], f"{r['accuracy']:.3f}", f"{r['frechet_distance']:.2f}"])
    md += table(["side", "training s", "steps", "accuracy", "Fréchet"], body)
    md += ["", f"Load average at the end: {', '.join(f'{x:.2f}' for x in results['machine']['load_average'])}."]
    write_results("quality_per_minute" + ("-quick" if args.quick else ""), results, md, args.out)


if __name__ == "__main__":
    main()
