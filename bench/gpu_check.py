"""The GPU path in one prepared run: CUDA tests, every seed recipe at its real size, NCCL DDP with resume, FSDP with
resume, MNIST.

    python bench/gpu_check.py                  # on a GPU machine: about 8 minutes; writes bench/results/gpu.{md,json}
    python bench/gpu_check.py --smoke          # on a CPU: the same stages at tiny sizes (checks the script itself)

Each stage runs `python -m difftrain ...` in a subprocess, so a crash in one stage is recorded and the next
one still runs. Training numbers come from the run's own files: images/s, loss, peak memory and wall time
per log line from metrics.jsonl; the FLOPs of one training step are counted once per recipe with
torch.utils.flop_counter on the resolved config (matmuls and convolutions, forward and backward), and MFU is
that over the measured bf16 matmul peak. Compile time is the time of the first log window beyond what its
steps cost at the steady rate. Data is written in the real formats where the real files are absent
(CIFAR-10 python pickles, an image folder, CelebA-HQ-sized images); MNIST is read from ../shared/data/mnist or
.gpu_data/mnist when there, else written as IDX files.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
QUIET = ["train.progress=false", "train.tensorboard=false"]


# --- data in the real formats ----------------------------------------------------------------------
def write_idx(path: Path, array: np.ndarray) -> None:
    """LeCun's IDX format (gzip): zero, zero, type 0x08, ndim, big-endian sizes, the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def mnist_folder(work: Path, n_train: int) -> tuple[Path, bool]:
    """(folder, real): the real MNIST files where present, else random digits-shaped IDX files."""
    for candidate in (ROOT.parent / "shared" / "data" / "mnist", ROOT / ".gpu_data" / "mnist"):
        if (candidate / "train-images-idx3-ubyte.gz").exists():
            return candidate, True
    folder = work / "mnist"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for kind, n in (("train", n_train), ("t10k", max(n_train // 6, 10))):
        write_idx(folder / f"{kind}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(folder / f"{kind}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    return folder, False


def cifar10_folder(work: Path, n_per_batch: int) -> Path:
    """CIFAR-10's python layout: five pickled training batches, a test batch and batches.meta."""
    folder = work / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"batch_label": name, "labels": [i % 10 for i in range(n_per_batch)],
                 "data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                 "filenames": [f"{i}.png" for i in range(n_per_batch)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}, protocol=2))
    return folder.parent


def image_folder(work: Path, name: str, n: int, size: int, classes: int) -> Path:
    """PNG files named CLASS_INDEX.png (guided-diffusion's class-from-prefix convention)."""
    from PIL import Image

    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"c{i % classes}_{i:05d}.png")
    return folder


# --- running difftrain --------------------------------------------------------------------------------
def difftrain(args: list[str], log: Path, timeout: float, launcher: list[str] | None = None) -> dict:
    """Run the CLI; returns {rc, seconds, tail}. The full output goes to `log`."""
    cmd = (launcher or [sys.executable, "-m"]) + ["difftrain", *args]
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = 124, f"{(e.stdout or b'').decode(errors='replace')}{(e.stderr or b'').decode(errors='replace')}\ntimed out"
    log.write_text(" ".join(cmd) + "\n" + out)
    return {"rc": rc, "seconds": round(time.perf_counter() - start, 1), "tail": out[-1500:]}


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return [r for r in rows if "loss" in r]


def step_flops(run_dir: Path, device: torch.device) -> int | None:
    """Matmul + convolution FLOPs of one training step (forward and backward) of the run's resolved config."""
    sys.path.insert(0, str(ROOT / "src"))
    import yaml
    from torch.utils.flop_counter import FlopCounterMode

    from difftrain.config import config_from_dict
    from difftrain.models import build_model
    from difftrain.processes import build_process

    cfg = config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    if cfg.autoencoder.kind != "none":
        return None
    m = cfg.model
    model = build_model(m).to(device)
    process = build_process(cfg.diffusion)
    b = cfg.train.batch_size
    x0 = torch.randn(b, m.in_channels, m.image_size, m.image_size, device=device)
    y = torch.randint(0, m.num_classes, (b,), device=device) if m.num_classes else None
    with FlopCounterMode(display=False) as counter:
        process.loss(lambda x, t: model(x, t, y), x0, process.sample_t(b, device)).mean().backward()
    return counter.get_total_flops()


def summarise(name: str, run_dir: Path, result: dict, peak_tflops: float, device: torch.device) -> dict:
    import yaml

    rows = read_metrics(run_dir)
    result = {"stage": name, **result, "log_lines": len(rows)}
    if not rows:
        return result
    batch = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["batch_size"]
    steady = [r["images_per_s"] for r in rows[1:] if r.get("images_per_s")] or [rows[-1].get("images_per_s") or 0]
    ips = float(np.median(steady))
    losses = [r["loss"] for r in rows if r.get("loss") is not None]
    result.update(images_per_s=round(ips, 1), loss_first=losses[0] if losses else None,
                  loss_last=losses[-1] if losses else None, nan=any(r.get("loss") is None for r in rows),
                  max_memory_gb=max((r.get("max_memory_gb") or 0) for r in rows) or None)
    if "time" in rows[0] and ips > 0:  # the first window's time beyond what its steps cost at the steady rate
        result["compile_s"] = round(max(0.0, rows[0]["time"] - rows[0]["step"] * batch / ips), 1)
    try:
        flops = step_flops(run_dir, device)
    except Exception as e:  # the FLOP count is a report detail: never fail a stage on it
        flops, result["flops_error"] = None, repr(e)[:200]
    if flops and peak_tflops > 0:
        result["gflop_per_image"] = round(flops / batch / 1e9, 3)
        result["mfu"] = round(ips * flops / batch / (peak_tflops * 1e12), 4)
    return result


def peak_tflops(device: torch.device, smoke: bool) -> float:
    """The bf16 matmul peak measured here (8192^3 products on a GPU; fp32 512^3 on a CPU smoke run)."""
    n, dtype = (512, torch.float32) if smoke else (8192, torch.bfloat16)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    reps, start = 10, time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


# --- the stages ------------------------------------------------------------------------------------------
def recipe_stages(work: Path, smoke: bool) -> list[tuple[str, list[str]]]:
    """(name, difftrain train arguments) per seed recipe at its real size, precision and compile setting."""
    mnist, _ = mnist_folder(work, 600 if smoke else 2000)
    cifar = cifar10_folder(work, 64 if smoke else 2000)
    adm = image_folder(work, "adm64", 64 if smoke else 512, 16 if smoke else 64, 10)
    faces = image_folder(work, "celebahq", 16 if smoke else 96, 32 if smoke else 256, 1)
    steps = 6 if smoke else 300
    tiny_dit = ["model.hidden_size=32", "model.depth=1", "train.batch_size=16"] if smoke else []
    tiny_unet = ["model.model_channels=16", "train.batch_size=8"] if smoke else []
    # smoke: the CPU, fp32, and a cheap final grid (cifar10's recipe samples with ddpm over all 1000 steps)
    cpu = ["train.device=cpu", "train.precision=fp32", "train.compile=false", "sample.steps=4"] if smoke else []
    every = [f"train.steps={steps}", f"train.log_every={max(steps // 10, 1)}", "train.sample_every=0",
             f"train.checkpoint_every={steps}", "train.warmup_steps=10"]
    ae = work / "runs" / "celebahq-vq-f4"
    return [
        ("mnist-dit-flow", ["mnist-dit-flow", f"data.path={mnist}", *every, *tiny_dit, *cpu]),
        ("mnist-dit-flow-fp32", ["mnist-dit-flow", f"data.path={mnist}", *every, "train.precision=fp32",
                                 "train.compile=false", *tiny_dit, *cpu]),
        ("cifar10-ddpm-cond", ["cifar10-ddpm-cond", f"data.path={cifar}", *every, "train.val_every=0", *tiny_unet, *cpu,
                               *(["sample.sampler=ddim"] if smoke else [])]),
        ("adm64-guided-diffusion", ["digits", "data.name=folder", f"data.path={adm}", "data.class_from=prefix",
                                    f"data.image_size={16 if smoke else 64}", "data.channels=3",
                                    "model.model_channels=128", "model.channel_mult=[1,2,3,4]", "model.num_res_blocks=2",
                                    "model.attention_resolutions=[2,4,8]", "model.num_head_channels=64",
                                    "model.resblock_updown=true", "diffusion.learn_sigma=true",
                                    "diffusion.schedule=cosine", "train.timestep_sampler=loss-second-moment",
                                    "train.lr=1e-4", "train.batch_size=64", "train.precision=fp16",
                                    "train.ema_rates=[0.9999]", "train.channels_last=false", *every, *tiny_unet,
                                    *(["model.num_head_channels=16"] if smoke else []), *cpu]),
        ("celebahq-vq-f4", ["celebahq-vq-f4", f"data.path={faces}", f"data.image_size={32 if smoke else 256}",
                            f"autoencoder.resolution={32 if smoke else 256}", "autoencoder.lpips_required=false",
                            *every, "train.val_every=0", *(["autoencoder.ch=16", "train.batch_size=4"] if smoke else []),
                            *cpu, f"run_dir={ae}"]),
        ("celebahq-ldm-vq4", ["celebahq-ldm-vq4", f"data.path={faces}", f"data.image_size={32 if smoke else 256}",
                              f"latent.first_stage={ae}", "latent.cache=false", *every, "train.val_every=0",
                              *(["model.model_channels=32", "model.num_head_channels=8", "train.batch_size=4",
                                 "model.image_size=8"] if smoke else []), *cpu]),
    ]


def run_recipes(work: Path, smoke: bool, device: torch.device, peak: float, logs: Path) -> list[dict]:
    results = []
    for name, args in recipe_stages(work, smoke):
        run_dir = next((Path(a.split("=", 1)[1]) for a in args if a.startswith("run_dir=")), work / "runs" / name)
        args = [a for a in args if not a.startswith("run_dir=")]
        res = difftrain(["train", *args, f"run_dir={run_dir}", *QUIET], logs / f"{name}.log", 300)
        results.append(summarise(name, run_dir, res, peak, device))
        print(json.dumps(results[-1])[:400], flush=True)
    return results


def run_cuda_tests(logs: Path, smoke: bool) -> dict:
    # Only the files that hold cuda-marked tests: others import packages a GPU image may lack (diffusers, hypothesis).
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py") if "mark.cuda" in p.read_text())
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", *files]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=240,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    (logs / "cuda-tests.log").write_text(proc.stdout + proc.stderr)
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    return {"stage": "pytest -m cuda", "rc": proc.returncode, "seconds": round(time.perf_counter() - start, 1),
            "summary": last}


def run_ddp_resume(work: Path, smoke: bool, logs: Path) -> dict:
    """torchrun, 1 process (NCCL on a GPU, gloo on a CPU): 20 steps, then resume to 40."""
    run_dir = work / "runs" / "ddp"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m"]
    base = ["train", "digits", f"run_dir={run_dir}", "train.checkpoint_every=20", "train.sample_every=0",
            "train.log_every=10", *QUIET, *(["train.device=cpu"] if smoke else [])]
    first = difftrain([*base, "train.steps=20"], logs / "ddp-1.log", 180, launcher)
    second = difftrain([*base, "train.steps=40"], logs / "ddp-2.log", 180, launcher)
    text = (logs / "ddp-2.log").read_text()
    steps = [r["step"] for r in read_metrics(run_dir)]
    return {"stage": "ddp-resume", "rc": max(first["rc"], second["rc"]), "seconds": first["seconds"] + second["seconds"],
            "resumed": "resumed from" in text, "backend_nccl": "nccl" in text.lower(),
            "steps_logged_once": steps == sorted(set(steps)), "tail": second["tail"][-600:]}


def run_fsdp_resume(work: Path, smoke: bool, logs: Path) -> dict:
    """train.parallel=fsdp with activation checkpointing under torchrun: 10 steps, then resume to 20. Sharding needs
    2 ranks: one per GPU (NCCL, bf16) with 2 or more GPUs, else 2 gloo processes on the CPU (fp32)."""
    gpus = 0 if smoke else torch.cuda.device_count()
    procs, on_gpu = (gpus, True) if gpus >= 2 else (2, False)
    run_dir = work / "runs" / "fsdp"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), "-m"]
    device = ["train.device=cuda", "train.precision=bf16"] if on_gpu else ["train.device=cpu", "train.precision=fp32"]
    base = ["train", "digits-dit-flow", f"run_dir={run_dir}", "train.parallel=fsdp", "train.activation_checkpointing=true",
            "train.compile=false", "train.checkpoint_every=10", "train.sample_every=0", "train.log_every=5",
            "train.batch_size=16", "sample.steps=4", *QUIET, *device,
            *(["model.hidden_size=32", "model.depth=2"] if not on_gpu else [])]
    first = difftrain([*base, "train.steps=10"], logs / "fsdp-1.log", 240, launcher)
    second = difftrain([*base, "train.steps=20"], logs / "fsdp-2.log", 240, launcher)
    text = (logs / "fsdp-2.log").read_text()
    rows = read_metrics(run_dir)
    steps = [r["step"] for r in rows]
    return {"stage": "fsdp-resume", "rc": max(first["rc"], second["rc"]), "seconds": first["seconds"] + second["seconds"],
            "processes": procs, "device": "cuda (NCCL)" if on_gpu else "cpu (gloo: sharding needs 2 GPUs)",
            "resumed": "resumed from" in text, "steps_logged_once": steps == sorted(set(steps)) and steps[-1:] == [20],
            "losses": [r["loss"] for r in rows if "loss" in r], "tail": second["tail"][-600:]}


def run_mnist_long(work: Path, smoke: bool, seconds_left: float, ips: float, logs: Path, out: Path) -> dict:
    """mnist-dit-flow for the rest of the budget (steps from the measured rate), then the classifier metric."""
    mnist, real = mnist_folder(work, 600 if smoke else 2000)
    batch = 16 if smoke else 256
    steps = max(20, int(0.8 * seconds_left * ips / batch)) if ips else 20
    run_dir = work / "runs" / "mnist-long"
    extra = (["model.hidden_size=32", "model.depth=1", f"train.batch_size={batch}", "train.device=cpu",
              "train.precision=fp32", "train.compile=false"] if smoke else [])
    res = difftrain(["train", "mnist-dit-flow", f"data.path={mnist}", f"train.steps={steps}", f"run_dir={run_dir}",
                     f"train.log_every={max(steps // 20, 1)}", "train.sample_every=0", f"train.checkpoint_every={steps}",
                     *extra, *QUIET], logs / "mnist-long.log", max(seconds_left, 60))
    result = {"stage": "mnist-dit-flow-long", "steps": steps, "real_mnist": real, "epochs": round(steps * batch / 62000, 2),
              **res}
    scores = work / "mnist-eval.json"
    ev = difftrain(["eval", str(run_dir), "--n", "100" if smoke else "1000", "--json", str(scores)],
                   logs / "mnist-eval.log", 240)
    result["eval_rc"] = ev["rc"]
    if scores.exists():
        result["eval"] = json.loads(scores.read_text())
    grid = run_dir / "samples" / "final.png"
    if grid.exists():
        (out / f"gpu{'-smoke' if smoke else ''}-mnist-grid.png").write_bytes(grid.read_bytes())
    return result


def write_markdown(report: dict, path: Path) -> None:
    lines = [f"# GPU check ({report['device_name']}, torch {report['torch']}, {report['date']})", "",
             f"Matmul peak measured (bf16 on a GPU, fp32 in a smoke run): {report['peak_tflops']:.3g} TFLOP/s. "
             f"Smoke run: {report['smoke']}.", "",
             "| stage | rc | s | images/s | MFU | GFLOP/img | peak GB | compile s | loss first -> last | NaN |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["stages"]:
        mfu = f"{100 * r['mfu']:.0f}%" if r.get("mfu") is not None else "-"
        loss = (f"{r['loss_first']:.4f} -> {r['loss_last']:.4f}" if r.get("loss_first") is not None
                and r.get("loss_last") is not None else "-")
        lines.append(f"| {r['stage']} | {r.get('rc')} | {r.get('seconds', '-')} | {r.get('images_per_s', '-')} | {mfu} | "
                     f"{r.get('gflop_per_image', '-')} | {r.get('max_memory_gb', '-')} | {r.get('compile_s', '-')} | "
                     f"{loss} | {r.get('nan', '-')} |")
    for key in ("cuda_tests", "ddp", "fsdp", "mnist"):
        lines += ["", f"`{key}`: `{json.dumps({k: v for k, v in report[key].items() if k != 'tail'})[:1500]}`"]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (checks the script)")
    p.add_argument("--budget", type=float, default=450, help="seconds for the whole check (MNIST gets the rest)")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", RESULTS)))
    p.add_argument("--work", type=Path, default=Path("/tmp/difftrain-gpu-check"))
    args = p.parse_args()
    start = time.perf_counter()
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    for old in ("runs", "logs"):  # a rerun starts fresh instead of resuming the last check's runs
        shutil.rmtree(args.work / old, ignore_errors=True)
    logs = args.work / "logs"  # joined into one file at the end: a device run brings back at most 8 files
    logs.mkdir(parents=True, exist_ok=True)
    peak = peak_tflops(device, args.smoke)
    report = {"device_name": torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke)",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "smoke": args.smoke, "peak_tflops": peak}
    report["cuda_tests"] = run_cuda_tests(logs, args.smoke)
    report["stages"] = run_recipes(args.work, args.smoke, device, peak, logs)
    report["ddp"] = run_ddp_resume(args.work, args.smoke, logs)
    report["fsdp"] = run_fsdp_resume(args.work, args.smoke, logs)
    ips = next((r.get("images_per_s") or 0 for r in report["stages"] if r["stage"] == "mnist-dit-flow"), 0)
    left = args.budget - (time.perf_counter() - start) - 60  # leave a minute for the evaluation
    report["mnist"] = run_mnist_long(args.work, args.smoke, left, ips, logs, args.out)
    report["total_s"] = round(time.perf_counter() - start, 1)
    name = "gpu-smoke" if args.smoke else "gpu"
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=1, default=str))
    write_markdown(report, args.out / f"{name}.md")
    joined = [f"===== {log.name}\n{log.read_text(errors='replace')[-20000:]}" for log in sorted(logs.glob("*.log"))]
    (args.out / f"{name}-logs.txt").write_text("\n".join(joined))
    print((args.out / f"{name}.md").read_text())


if __name__ == "__main__":
    main()
