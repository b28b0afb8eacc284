"""Sample quality against model evaluations (NFE) for every VP sampler on the digits model.

Quality is measured with difftrain's offline digits metric (`evaluation.digits`): a small CNN
classifier trained on the digits train split (cached; its test accuracy is printed) gives the
class accuracy of class-conditional samples and the Fréchet distance between classifier
features of the samples and of the test split (lower is better; `frechet_floor` is the
train-vs-test distance, what real digits score). All samplers start from the same per-sample
noise and labels, so rows differ only by the sampler and its step count.

    .venv/bin/python bench/sampler_quality.py RUN_DIR [--n 100] [--guidance 1] [--out bench/results]

Writes sampler_quality.json, sampler_quality.md and sampler_quality.png to --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from difftrain.evaluation.digits import digits_metrics
from difftrain.generation import cycled_labels, generate, load_run
from difftrain.samplers import SAMPLERS as TABLE
from difftrain.samplers import model_calls

# (sampler, extra sample options): every VP sampler; spacing trailing (the recipe default) unless noted
SAMPLERS = [
    ("ddpm", {}), ("ddim", {}), ("euler", {}), ("heun", {}), ("dpmpp-2m", {}), ("dpmpp-2m-sde", {}),
    ("dpmpp-2m", {"spacing": "karras"}),
]
NFES = [5, 10, 20, 50, 100]


def steps_for(name: str, nfe: int) -> int:
    """The steps whose model calls come nearest `nfe` from above (Heun: 2 per step, 1 at the last)."""
    calls = TABLE[name].calls_per_step
    return (nfe + calls - 1) // calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--n", type=int, default=100, help="samples per point (default 100: 10 per class)")
    ap.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (default 1: conditional)")
    ap.add_argument("--nfe", default=",".join(map(str, NFES)))
    ap.add_argument("--extra", default="", help="more NFE for some samplers, e.g. ddpm:1000,ddim:250")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    torch.manual_seed(0)
    run = load_run(args.run, device="cpu")
    cfg = run.cfg
    labels = cycled_labels(args.n, cfg.model.num_classes)
    nfes = [int(v) for v in args.nfe.split(",")]
    extra: dict[str, list[int]] = {}
    for item in filter(None, args.extra.split(",")):
        name, nfe = item.split(":")
        extra.setdefault(name, []).append(int(nfe))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "sampler_quality.rows.jsonl"  # rows so far: a rerun skips them (delete to start over)
    done = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    rows = []
    for name, opts in SAMPLERS:
        for nfe in nfes + extra.get(name, []):
            label = name + (f" ({opts['spacing']})" if opts else "")
            prev = [r for r in done if r["sampler"] == label and r["steps"] == steps_for(name, nfe)]
            if prev:
                rows.append(prev[0])
                continue
            sc = cfg.sample
            sc.spacing, sc.respacing = opts.get("spacing", "trailing"), ""
            steps = steps_for(name, nfe)
            if name == "ddpm":
                sc.respacing = str(steps)  # guided-diffusion respacing: ddpm over `steps` of the 1000 timesteps
            start = time.perf_counter()
            images = generate(run.model, cfg, args.n, labels=labels, seed=0, sampler=name, steps=steps,
                              guidance=args.guidance, eta=0.0, batch_size=args.n)
            seconds = time.perf_counter() - start
            m = digits_metrics(images, labels)
            row = {"sampler": label, "steps": steps, "nfe": model_calls(name, steps), "accuracy": m["accuracy"],
                   "frechet_distance": m["frechet_distance"], "seconds": round(seconds, 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            with log.open("a") as f:
                f.write(json.dumps(row) + "\n")
    m = digits_metrics(generate(run.model, cfg, 2, labels=labels[:2], sampler="ddim", steps=2), labels[:2])
    meta = {"run": str(run.source), "step": run.step, "n": args.n, "guidance": args.guidance, "seed": 0,
            "classifier_test_accuracy": m["classifier_test_accuracy"], "frechet_floor": m["frechet_floor"],
            "metric": "evaluation.digits (CNN classifier trained on the digits train split)"}
    (out / "sampler_quality.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    write_markdown(out / "sampler_quality.md", meta, rows)
    write_plot(out / "sampler_quality.png", meta, rows)
    print(f"wrote {out}/sampler_quality.{{json,md,png}}")


def budget(row: dict, budgets: set[int]) -> int:
    """The NFE column a row belongs to: Heun's 2 x steps - 1 calls sit in the budget one above."""
    return row["nfe"] if row["nfe"] in budgets else row["nfe"] + 1


def write_markdown(path: Path, meta: dict, rows: list[dict]) -> None:
    names = list(dict.fromkeys(r["sampler"] for r in rows))
    budgets = {r["nfe"] for r in rows if not r["sampler"].startswith("heun")}
    cols = sorted(budgets)
    cell = {(r["sampler"], budget(r, budgets)): r for r in rows}
    lines = [f"# Sample quality vs model evaluations, digits model ({meta['run']}, step {meta['step']})", "",
             f"{meta['n']} class-conditional samples per cell (10 per class), guidance {meta['guidance']}, seed 0, "
             f"the same starting noise for every sampler; trailing spacing unless named; ddpm respaced "
             f"(guided-diffusion `timestep_respacing`). Metric: {meta['metric']}; classifier test accuracy "
             f"{meta['classifier_test_accuracy']:.3f}. The Fréchet distance of only 100 samples carries a large "
             f"finite-sample bias (the train-vs-test floor with all images is {meta['frechet_floor']:.2f}) and noise "
             f"that was not measured across seeds; the stochastic samplers' spread over budgets (ddpm, "
             f"dpmpp-2m-sde) suggests differences below ~1 are ties. Heun's cells use "
             f"2 x steps - 1 model calls (5, 9, 19, 49, 99, 199), one below the column's budget.", ""]
    for key, title in (("frechet_distance", "## Fréchet distance to the test split (lower is better)"),
                       ("accuracy", "## Class accuracy of the samples (higher is better)")):
        lines += [title, "", "| sampler | " + " | ".join(f"NFE {n}" for n in cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for name in names:
            vals = [cell.get((name, n)) for n in cols]
            lines.append(f"| {name} | " + " | ".join(f"{v[key]:.2f}" if v else "" for v in vals) + " |")
        lines.append("")
    lines += ["Seconds per cell (100 samples, CPU, shared machine) are in sampler_quality.json.", ""]
    path.write_text("\n".join(lines))


def write_plot(path: Path, meta: dict, rows: list[dict]) -> None:
    """Two log-x line charts (Fréchet distance, accuracy vs NFE) drawn with PIL (no matplotlib here)."""
    import math

    from PIL import Image, ImageDraw

    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    names = list(dict.fromkeys(r["sampler"] for r in rows))
    W, H, pad = 520, 380, 60
    img = Image.new("RGB", (2 * W, H + 40), "white")
    d = ImageDraw.Draw(img)
    nfes = [r["nfe"] for r in rows]
    lx0, lx1 = math.log10(min(nfes)), math.log10(max(nfes))
    for panel, (key, title, logy) in enumerate([("frechet_distance", "Frechet distance (lower is better)", True),
                                                ("accuracy", "class accuracy (higher is better)", False)]):
        ox = panel * W
        vals = [r[key] for r in rows] + ([meta["frechet_floor"]] if key == "frechet_distance" else [])
        f = (lambda v: math.log10(max(v, 1e-6))) if logy else (lambda v: v)
        y0, y1 = min(map(f, vals)), max(map(f, vals))
        y1 += (y1 - y0) * 0.05 or 1

        def xy(nfe, v):
            x = ox + pad + (math.log10(nfe) - lx0) / (lx1 - lx0) * (W - 2 * pad)
            return x, pad + (1 - (f(v) - y0) / (y1 - y0)) * (H - 2 * pad)

        d.rectangle([ox + pad, pad, ox + W - pad, H - pad], outline="black")
        d.text((ox + pad, 20), title, fill="black")
        for n in sorted(set(nfes)):
            x, _ = xy(n, vals[0])
            d.line([x, H - pad, x, H - pad + 5], fill="black")
            d.text((x - 8, H - pad + 8), str(n), fill="black")
        d.text((ox + W // 2 - 40, H - pad + 24), "model evaluations (NFE)", fill="black")
        for k in range(5):
            yv = y0 + (y1 - y0) * k / 4
            _, y = xy(min(nfes), (10**yv) if logy else yv)
            d.text((ox + 5, y - 6), f"{(10**yv) if logy else yv:.2f}", fill="black")
        if key == "frechet_distance":
            _, y = xy(min(nfes), meta["frechet_floor"])
            d.line([ox + pad, y, ox + W - pad, y], fill="gray")
            d.text((ox + W - pad - 120, y - 12), "train vs test digits", fill="gray")
        for i, name in enumerate(names):
            pts = [xy(r["nfe"], r[key]) for r in sorted((r for r in rows if r["sampler"] == name), key=lambda r: r["nfe"])]
            d.line(pts, fill=colors[i % len(colors)], width=2)
            for x, y in pts:
                d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colors[i % len(colors)])
    for i, name in enumerate(names):
        d.rectangle([10 + i * 145, H + 15, 22 + i * 145, H + 27], fill=colors[i % len(colors)])
        d.text((26 + i * 145, H + 15), name, fill="black")
    img.save(path)


if __name__ == "__main__":
    main()
