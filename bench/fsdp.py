"""FSDP2 against DDP on 2 gloo processes, side by side in one run; and DCP save / load against today's checkpoint.

Part 1: the same `torchrun --nproc_per_node 2 -m difftrain train RECIPE` job with train.parallel=ddp and =fsdp, in
interleaved rounds (other load on a shared machine hits both alike): the final logged loss, images/s after the
first log window (median over rounds) and their ratio, and per rank the bytes of the AdamW state, of the
gradients and of the trained parameters it holds (local shards under FSDP), read after training, and its peak
resident memory (ru_maxrss: dominated by torch itself at this size). FSDP keeps the whole plain module besides its
shards on every rank (the EMAs, grids and evaluation read it), so only the gradients and the AdamW state shrink.

Part 2 (one process): the mnist-dit-flow model (28x28 MNIST, 10 classes) with its AdamW state after one step and
an EMA, written with difftrain's checkpoint (`save_checkpoint`: torch.save, fsync, rename) and read back with
`load_checkpoint` (weights_only), against torch.distributed.checkpoint's save / load of the same tensors into a
folder; median of --reps.

    .venv/bin/python bench/fsdp.py                    # digits-dit-flow, 3 rounds of 45 steps
    .venv/bin/python bench/fsdp.py --rounds 1 --steps 15

Writes bench/results/fsdp.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, cpu_name  # noqa: E402

KINDS = ("ddp", "fsdp")


def local_bytes(tensors) -> int:
    """Bytes this rank holds of `tensors` (a DTensor counts its local shard)."""
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def worker(argv: list[str]) -> int:
    """Under torchrun: `difftrain train ARGV`, then RUN_DIR/memory-RANK.json of what this rank held."""
    from difftrain.cli import main as cli_main
    from difftrain.training import Engine

    run = Engine.run

    def run_and_measure(self):
        out = run(self)
        par, opt = self.task.parallel, self.task.stepper.opt
        params = par.parameters()
        state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
        record = {"optimizer_bytes": local_bytes(state), "param_bytes": local_bytes(params),
                  "grad_bytes": local_bytes(p.grad for p in params if p.grad is not None),
                  "plain_bytes": local_bytes(par.unwrap().parameters()),  # FSDP: kept whole besides the shards
                  "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        (Path(self.cfg.run_dir) / f"memory-{self.world.rank}.json").write_text(json.dumps(record))
        return out

    Engine.run = run_and_measure
    return cli_main(argv)


def run_job(kind: str, args, run_dir: Path) -> dict:
    """One 2-process job: images/s after the first window, the last loss, and each rank's memory record."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, "--worker",
           "train", args.recipe, f"run_dir={run_dir}", f"train.parallel={kind}", f"train.batch_size={args.batch}",
           f"train.steps={args.steps}", f"train.log_every={args.log_every}", "train.progress=false",
           "train.tensorboard=false", "train.sample_every=0", "train.checkpoint_every=0", "train.device=cpu",
           "train.precision=fp32", "train.compile=false", "sample.steps=2", *args.overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["images_per_s"] for r in rows if "images_per_s" in r][1:]  # the first window warms up
    losses = [r["loss"] for r in rows if "loss" in r]
    memory = [json.loads((run_dir / f"memory-{r}.json").read_text()) for r in (0, 1)]
    return {"images_per_s": statistics.mean(speeds), "losses": losses, "memory": memory}


def checkpoint_times(reps: int) -> dict:
    """Seconds to write and read the mnist-dit-flow state: difftrain's checkpoint against DCP (one process)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process, on purpose

    from difftrain.checkpoint import load_checkpoint, save_checkpoint
    from difftrain.config import load_config
    from difftrain.models import build_model

    cfg = load_config("mnist-dit-flow", ["model.in_channels=1", "model.image_size=28", "model.num_classes=10"])
    model = build_model(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(2, 1, 28, 28), torch.rand(2), torch.tensor([0, 1])).square().mean().backward()
    opt.step()
    ema = {k: v.clone() for k, v in model.state_dict().items()}
    state = {"model": model.state_dict(), "ema": ema, "optimizer": opt.state_dict()}
    tensors = {"model": model.state_dict(), "ema": ema,
               "optimizer": {f"{i}.{k}": v for i, s in opt.state_dict()["state"].items() for k, v in s.items()}}
    times = {"torch_save": [], "torch_load": [], "dcp_save": [], "dcp_load": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(reps):
            path, folder = Path(tmp) / f"step-{r}.pt", Path(tmp) / f"step-{r}.dcp"
            start = time.perf_counter()
            save_checkpoint(state, path)
            times["torch_save"].append(time.perf_counter() - start)
            start = time.perf_counter()
            load_checkpoint(path)
            times["torch_load"].append(time.perf_counter() - start)
            start = time.perf_counter()
            dcp.save(tensors, checkpoint_id=folder)
            times["dcp_save"].append(time.perf_counter() - start)
            target = {k: {n: torch.empty_like(v) for n, v in d.items()} for k, d in tensors.items()}
            start = time.perf_counter()
            dcp.load(target, checkpoint_id=folder)
            times["dcp_load"].append(time.perf_counter() - start)
            assert all(torch.equal(target[k][n], tensors[k][n]) for k in tensors for n in tensors[k])
            size = {"pt_bytes": path.stat().st_size, "dcp_bytes": sum(f.stat().st_size for f in folder.iterdir())}
            path.unlink()
            shutil.rmtree(folder)
    params = sum(p.numel() for p in model.parameters())
    return {"parameters": params, **size, **{k: statistics.median(v) for k, v in times.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="digits-dit-flow")
    p.add_argument("--batch", type=int, default=32, help="images per rank per step")
    p.add_argument("--steps", type=int, default=45)
    p.add_argument("--log-every", type=int, default=15)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=5, help="checkpoint writes and reads per format")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "fsdp"))
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args()

    load_before = os.getloadavg()[0]
    jobs = {k: [] for k in KINDS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for kind in KINDS:
                jobs[kind].append(run_job(kind, args, Path(tmp) / f"{r}-{kind}"))
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"{k} {jobs[k][-1]['images_per_s']:.0f} img/s" for k in KINDS), file=sys.stderr)
    ips = {k: statistics.median(j["images_per_s"] for j in jobs[k]) for k in KINDS}
    ckpt = checkpoint_times(args.reps)
    results = {"recipe": args.recipe, "overrides": args.overrides, "batch_per_rank": args.batch, "steps": args.steps,
               "rounds": args.rounds, "torch": torch.__version__, "cpu": cpu_name(), "cpus": os.cpu_count(),
               "load_average_1min": [load_before, os.getloadavg()[0]],
               "variants": {k: {"images_per_s": ips[k], "ratio_to_ddp": ips[k] / ips["ddp"],
                                "last_losses": [j["losses"][-1] for j in jobs[k]], "memory": jobs[k][0]["memory"],
                                "rounds_images_per_s": [j["images_per_s"] for j in jobs[k]]} for k in KINDS},
               "checkpoint": ckpt}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    mb = 1 / 2**20
    lines = [f"# FSDP2 against DDP on 2 gloo processes ({args.recipe}, {os.cpu_count()} CPUs, torch {torch.__version__})",
             "", f"Batch {args.batch} per rank, {args.steps} steps, median of {args.rounds} interleaved rounds; "
             f"images/s after the first {args.log_every}-step window. `bench/fsdp.py`. 1-minute load average "
             f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after (other jobs shared the {os.cpu_count()} CPUs: "
             f"the throughput is noisy).", "",
             "| variant | images/s | ratio to DDP | last loss (per round) | AdamW state MB per rank | grads MB | "
             "trained params MB | whole module MB | peak RSS MB (rank 0) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for k, v in results["variants"].items():
        m = v["memory"]
        per_rank = {key: " / ".join(f"{r[key] * mb:.2f}" for r in m) for key in ("optimizer_bytes", "grad_bytes",
                                                                               "param_bytes", "plain_bytes")}
        losses = ", ".join(f"{x:.4f}" for x in v["last_losses"])
        lines.append(f"| {k} | {v['images_per_s']:.0f} | {v['ratio_to_ddp']:.2f} | {losses} | "
                     f"{per_rank['optimizer_bytes']} | {per_rank['grad_bytes']} | {per_rank['param_bytes']} | "
                     f"{per_rank['plain_bytes']} | {m[0]['max_rss_mb']:.0f} |")
    c = ckpt
    lines += ["", f"Checkpoint of the mnist-dit-flow model ({c['parameters'] / 1e6:.2f}M parameters, + AdamW state + one "
              f"EMA; one process, median of {args.reps}):", "",
              "| format | bytes | save s | load s |", "| --- | --- | --- | --- |",
              f"| difftrain .pt (torch.save, fsync, rename; weights_only load) | {c['pt_bytes']} | {c['torch_save']:.3f} | "
              f"{c['torch_load']:.3f} |",
              f"| torch.distributed.checkpoint folder | {c['dcp_bytes']} | {c['dcp_save']:.3f} | {c['dcp_load']:.3f} |"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        raise SystemExit(worker(sys.argv[2:]))
    main()
