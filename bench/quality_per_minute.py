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
time each first reaches `--target` accuracy, and their ratio.

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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    build_unet2d, machine, matched_unet2d_overrides, n_params, setup_threads, table, trainer, write_results,
)
from sample_throughput import diffusers_pipeline  # noqa: E402

PEER_HPARAMS = {
    # ours: the digits recipe's values (train.*)
    "recipe": None,
    # diffusers/examples/unconditional_image_generation/train_unconditional.py defaults
    "example": {"batch_size": 16, "lr": 1e-4, "betas": (0.95, 0.999), "weight_decay": 1e-6, "warmup_steps": 500,
                "ema_max_decay": 0.9999},
}


class Ours:
    """The digits recipe through difftrain's training Engine."""

    def __init__(self, recipe: str, run_dir: Path):
        self.tr = trainer(recipe, [], run_dir)
        self.cfg = self.tr.cfg

    def step(self) -> None:
        from difftrain.training.schedules import lr_at

        self.tr.train_step(lr_at(self.tr.step, self.cfg))
        self.tr.step += 1

    @property
    def steps(self) -> int:
        return self.tr.step

    def sample(self, labels: torch.Tensor) -> torch.Tensor:
        from difftrain.generation import generate

        return generate(self.tr.task.ema.model, self.cfg, len(labels), labels=labels, seed=0, batch_size=len(labels))


class Peer:
    """diffusers' train_unconditional loop, class-conditional (label dropout to a null class)."""

    def __init__(self, ours_cfg, ours_params: int, hparams: str, seed: int = 0):
        from diffusers import DDPMScheduler
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel
        from difftrain.config import ModelConfig
        from difftrain.data.digits import load_digits_splits
        from difftrain.data.memory import to_model_range

        torch.manual_seed(seed)
        m, t, d = ours_cfg.model, ours_cfg.train, ours_cfg.diffusion
        overrides, _ = matched_unet2d_overrides(ours_params, m.image_size, m.in_channels, m.num_classes,
                                                list(m.channel_mult), m.num_res_blocks, list(m.attention_resolutions))
        width = int(next(o for o in overrides if o.startswith("model.model_channels=")).split("=")[1])
        self.cfg = ours_cfg
        self.model_cfg = ModelConfig(name="diffusers_unet2d", model_channels=width, channel_mult=list(m.channel_mult),
                                     num_res_blocks=m.num_res_blocks, attention_resolutions=list(m.attention_resolutions),
                                     num_heads=m.num_heads, in_channels=m.in_channels, image_size=m.image_size,
                                     num_classes=m.num_classes)
        self.model = build_unet2d(self.model_cfg)
        self.unet = self.model.unet
        h = PEER_HPARAMS[hparams] or {"batch_size": t.batch_size, "lr": t.lr, "betas": tuple(t.betas),
                                      "weight_decay": t.weight_decay, "warmup_steps": t.warmup_steps,
                                      "ema_max_decay": t.ema_rates[0]}
        self.hparams = {"name": hparams, **h}
        self.scheduler = DDPMScheduler(num_train_timesteps=d.timesteps, beta_schedule="linear",
                                       beta_start=d.beta_start, beta_end=d.beta_end)
        self.opt = torch.optim.AdamW(self.unet.parameters(), lr=h["lr"], betas=h["betas"],
                                     weight_decay=h["weight_decay"], eps=1e-8)
        self.lr_scheduler = get_scheduler("constant_with_warmup", optimizer=self.opt,
                                          num_warmup_steps=h["warmup_steps"])
        self.ema = EMAModel(self.unet.parameters(), decay=h["ema_max_decay"], use_ema_warmup=True,
                            inv_gamma=1.0, power=3 / 4)
        train = load_digits_splits(m.image_size, ours_cfg.data.test_fraction, ours_cfg.data.split_seed).train
        self.images, self.labels = to_model_range(train.images), train.labels
        self.batch_size, self.label_dropout, self.null = h["batch_size"], t.label_dropout, m.num_classes
        self.order, self.pos, self.steps = torch.randperm(len(self.images)), 0, 0
        self.grad_clip = t.grad_clip

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A shuffled pass over the training split, as a DataLoader with shuffle=True."""
        if self.pos >= len(self.order):
            self.order, self.pos = torch.randperm(len(self.images)), 0
        idx = self.order[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return self.images[idx], self.labels[idx]

    def step(self) -> None:
        clean, y = self.batch()
        y = torch.where(torch.rand(len(y)) < self.label_dropout, torch.full_like(y, self.null), y)
        noise = torch.randn_like(clean)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(clean),)).long()
        noisy = self.scheduler.add_noise(clean, noise, timesteps)
        pred = self.unet(noisy, timesteps, class_labels=y, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), self.grad_clip)
        self.opt.step()
        self.lr_scheduler.step()
        self.opt.zero_grad()
        self.ema.step(self.unet.parameters())
        self.steps += 1

    def sample(self, labels: torch.Tensor) -> torch.Tensor:
        from difftrain.data.memory import to_uint8

        self.ema.store(self.unet.parameters())
        self.ema.copy_to(self.unet.parameters())
        try:
            self.unet.eval()
            x = diffusers_pipeline(self.unet, self.cfg, labels, self.cfg.sample.steps, self.cfg.sample.guidance)
        finally:
            self.ema.restore(self.unet.parameters())
            self.unet.train()
        return to_uint8(x)


def evaluate(side, n: int) -> dict:
    from difftrain.evaluation.digits import digits_metrics
    from difftrain.generation import cycled_labels

    labels = cycled_labels(n, 10)
    start = time.perf_counter()
    with torch.random.fork_rng():
        images = side.sample(labels)
    m = digits_metrics(images, labels)
    return {"accuracy": m["accuracy"], "frechet_distance": m["frechet_distance"], "frechet_floor": m["frechet_floor"],
            "classifier_test_accuracy": m["classifier_test_accuracy"], "eval_s": time.perf_counter() - start}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
        ours = Ours(args.recipe, Path(tmp) / "ours")
        peer = Peer(ours.cfg, n_params(ours.tr.task.model), args.peer_hparams)
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
               "n": args.n, "target": args.target, "quick": args.quick, "peer_hparams": peer.hparams, "params": params,
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
