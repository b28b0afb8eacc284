"""Regenerate the README's "Performance" table from bench/results/*.json.

Reads train_throughput.json, sample_throughput.json, quality_per_minute.json and
quality_per_minute-mnist.json (or their
`-quick` variants when a full run is missing; such rows are marked "quick") and replaces the text
between `<!-- perf:start -->` and `<!-- perf:end -->` in README.md. Missing results leave their rows out.

    .venv/bin/python bench/report.py                 # rewrite README.md in place
    .venv/bin/python bench/report.py --print         # print the table only
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- perf:start -->", "<!-- perf:end -->"
BUSY = 1.5  # load average above this many x the cores (the benchmark itself adds ~1 x) marks a busy machine


def load(results: Path, name: str) -> tuple[dict | None, bool]:
    """(results, quick) of bench/results/NAME.json, else NAME-quick.json."""
    for file, quick in ((results / f"{name}.json", False), (results / f"{name}-quick.json", True)):
        if file.exists():
            return json.loads(file.read_text()), quick
    return None, False


def _secs(s: float | None) -> str:
    return "not reached" if s is None else f"{s:.0f} s"


def render(results: Path) -> str:
    """The markdown between the markers: one table and the machine it was measured on."""
    rows, machines = [], []
    train, quick = load(results, "train_throughput")
    if train:
        machines.append(train["machine"] | {"peak": f"{train['cases'][0]['peak_gflops']:.0f}" if train["cases"] else "?"})
        for c in train["cases"]:
            o, d = c["sides"]["difftrain"], c["sides"]["diffusers"]
            what = (f"training images/s, `{c.get('row', c['recipe'])}` ({o['model']} {o['params'] / 1e6:.1f}M vs "
                    f"{c.get('peer', 'UNet2DModel')} "
                    f"{d['params'] / 1e6:.1f}M, {c['image_size']}x{c['image_size']}, batch {c['batch_size']})")
            rows.append([what + (" (quick)" if quick else ""), f"{o['images_per_s']:.0f} (MFU {o['mfu']:.0%})",
                         f"{d['images_per_s']:.0f} (MFU {d['mfu']:.0%})", f"{c['ratio']:.2f}x", "≥ 1.2x, MFU ≥ 60%"])
    sample, quick = load(results, "sample_throughput")
    if sample:
        machines.append(sample["machine"] | {"peak": f"{sample['peak_gflops']:.0f}"})
        by_steps: dict[int, dict] = {}
        for r in sample["rows"].values():
            by_steps.setdefault(r["steps"], {})[(r["side"], r["sampler"])] = r
        for steps, rs in sorted(by_steps.items(), reverse=True):
            ours, peer = rs.get(("difftrain", "ddim")), rs.get(("diffusers", "DDIMScheduler"))
            if ours and peer:
                rows.append([f"sampling images/s, `{sample['recipe']}`, DDIM {steps} steps, guidance "
                             f"{sample['guidance']:g}, batch {sample['batch']}" + (" (quick)" if quick else ""),
                             f"{ours['images_per_s']:.1f}", f"{peer['images_per_s']:.1f}",
                             f"{ours['images_per_s'] / peer['images_per_s']:.2f}x", "≥ 2x"])
    quality, quick = load(results, "quality_per_minute")
    if quality:
        machines.append(quality["machine"])
        reach, budget = quality["time_to_target_s"], quality["budget_s"]
        ratio = quality["ratio"]
        rows.append([f"training time to {quality['target']:.0%} conditional accuracy (digits metric, n={quality['n']}), "
                     f"`{quality['recipe']}` vs UNet2DModel + DDPMScheduler (budgets {budget['difftrain']:.0f} / "
                     f"{budget['diffusers']:.0f} s)" + (" (quick)" if quick else ""),
                     _secs(reach["difftrain"]), _secs(reach["diffusers"]),
                     f"{ratio:.2f}x" if ratio else "n/a", "≤ 180 s; peer ≥ 2x as long"])
    mnist, quick = load(results, "quality_per_minute-mnist")
    if mnist:
        machines.append(mnist["machine"] | {"peak": f"{mnist['peak_gflops']:.0f}"})
        rows += mnist_rows(mnist, quick)
    if not rows:
        return "No results yet: run `make bench`."
    lines = ["| measure | difftrain | diffusers | ratio | target |", "| --- | --- | --- | --- | --- |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    m = machines[0]
    dates = sorted({x["date"] for x in machines})
    lines += ["", f"Measured on {m['cpu']}, {m['cores']} cores ({m['threads']} torch threads), torch {m['torch']}, "
                  f"diffusers {m['diffusers']}, fp32 matmul peak {m.get('peak', '?')} GFLOP/s, "
                  f"{dates[0]}{' to ' + dates[-1] if len(dates) > 1 else ''}; load average at the end of each script: "
                  + ", ".join(f"{x['load_average'][0]:.1f}" for x in machines) + ". Details: `bench/results/*.md`."]
    if any(x["load_average"][0] > BUSY * x["cores"] for x in machines):
        lines += ["", "**Measured on a busy machine** (1-minute load average above "
                      f"{BUSY:g} x the cores, of which the benchmark itself is about 1 x): only the ratios mean "
                      "anything, and they are noisy; run `make bench` on an idle machine before quoting these numbers."]
    return "\n".join(lines)


def mnist_rows(res: dict, quick: bool) -> list[list[str]]:
    """One row per training time where both difftrain's `mnist` recipe and a diffusers peer were scored:
    ours against the best peer there (lowest Fréchet distance); the ratio is the peer's distance over ours."""
    def minutes(r: dict) -> float:
        return round(r["train_s"] / 60, 1)

    ours = {minutes(r): r for r in res["rows"] if r["side"].startswith("difftrain mnist (")}
    peers: dict[float, dict] = {}
    for r in res["rows"]:
        if r["side"].startswith("diffusers") and (minutes(r) not in peers or
                                                   r["frechet_distance"] < peers[minutes(r)]["frechet_distance"]):
            peers[minutes(r)] = r
    a, rows = res["args"], []
    for m in sorted(set(ours) & set(peers)):
        o, d = ours[m], peers[m]
        rows.append([f"MNIST 28x28 after {m:g} min of training: accuracy / Fréchet (classifier metric, n={a['n']}, "
                     f"{a['steps']} steps, guidance {a['guidance']:g}, floor {o['frechet_floor']:.2f}), `mnist` vs "
                     f"the best peer there, {d['side']}" + (" (quick)" if quick else ""),
                     f"{o['accuracy']:.3f} / {o['frechet_distance']:.2f}", f"{d['accuracy']:.3f} / {d['frechet_distance']:.2f}",
                     f"{d['frechet_distance'] / o['frechet_distance']:.2f}x", "accuracy ≥ 0.98, Fréchet ≤ 2x floor"])
    return rows


def update_readme(readme: Path, text: str) -> None:
    content = readme.read_text()
    if START not in content or END not in content:
        raise SystemExit(f"{readme} has no {START} ... {END} markers; add them where the table belongs")
    head, rest = content.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{text}\n{END}{tail}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(ROOT / "bench" / "results"))
    p.add_argument("--readme", default=str(ROOT / "README.md"))
    p.add_argument("--print", action="store_true", help="print the table instead of writing the README")
    args = p.parse_args()
    text = render(Path(args.results))
    if args.print:
        print(text)
    else:
        update_readme(Path(args.readme), text)
        print(f"updated {args.readme}:\n{text}")


if __name__ == "__main__":
    main()
