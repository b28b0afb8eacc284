"""The README.md model card of an exported run: Hub front matter, the diffusers code that samples it
(with classifier-free guidance where the model has classes), the training config and the run's metrics."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import yaml

from difftrain.config import Config
from difftrain.interop.exported import Exported, ExportReport
from difftrain.report.rundata import read_metrics_file

MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]#|!~])")


def md_escape(text: object) -> str:
    """`text` as literal Markdown inline text on one line: newlines become spaces (no new block can start),
    & < > become HTML entities (no tag gets through) and Markdown's markup characters are backslash-escaped."""
    text = html.escape(" ".join(str(text).split()), quote=False)
    return MARKDOWN_SPECIAL.sub(r"\\\1", text)


def fence(text: str, info: str = "") -> tuple[str, str]:
    """Opening and closing code fence for `text`: longer than any run of backticks in it, so it cannot be closed early."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    bar = "`" * max(3, longest + 1)
    return bar + info, bar


class _QuotedDumper(yaml.SafeDumper):
    """Front matter with every string double-quoted on one line (escapes for newlines and quotes): no value can
    end the front matter with a `---` line or change its structure."""


_QuotedDumper.add_representer(str, lambda dumper, value: dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"'))

STEP_KEYS = {"UNet2DModel": "unet", "SD3Transformer2DModel": "transformer", "FluxTransformer2DModel": "transformer"}


def read_metrics(run_dir: Path) -> dict[str, tuple[int, float]]:
    """The last finite value of every key in metrics.jsonl, with the step it was logged at. Read by the report's
    reader: damaged, non-UTF-8, deeply nested or non-finite lines are skipped there, never raised."""
    rows, _ = read_metrics_file(Path(run_dir) / "metrics.jsonl")
    last: dict[str, tuple[int, float]] = {}
    for row in rows:
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                last[key] = (int(row["step"]), value)
    return last


def read_evals(run_dir: Path) -> dict[str, dict]:
    """`eval*.json` files in the run directory (written by `difftrain eval --json`): their numeric values."""
    out = {}
    for path in sorted(Path(run_dir).glob("eval*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict):
            out[path.name] = {k: v for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return out


def front_matter(cfg: Config, exported: Exported, report: ExportReport) -> dict:
    k = cfg.model.num_classes or 0
    names = report.facts["class_names"] or [str(i) for i in range(k)]
    tags = ["difftrain", "diffusion", "flow-matching" if cfg.diffusion.process == "flow" else "ddpm",
            "dit" if exported.target != "unet" else "adm-unet",
            "class-conditional-image-generation" if k else "unconditional-image-generation"]
    meta = {"library_name": "diffusers", "tags": tags, "datasets": [cfg.data.name], "resolution": cfg.model.image_size,
            "classes": names[:k] if k else []}
    if report.pipeline:
        meta["pipeline_tag"] = "unconditional-image-generation"
    return meta


def model_card(cfg: Config, exported: Exported, report: ExportReport) -> str:
    run_dir = Path(report.facts["run_dir"])
    k = cfg.model.num_classes or 0
    head = yaml.dump(front_matter(cfg, exported, report), Dumper=_QuotedDumper, sort_keys=False, width=float("inf"))
    lines = [f"---\n{head}---", "", f"# {md_escape(cfg.recipe or run_dir.name)}: {exported.class_name}", "",
             f"A {'class-conditional' if k else 'unconditional'} {cfg.diffusion.process} model of "
             f"{cfg.model.image_size}x{cfg.model.image_size} {cfg.data.name} images ({cfg.model.in_channels} channel(s)), "
             f"trained with difftrain and exported to diffusers' layout "
             f"({report.facts['weights']} weights; difftrain's and diffusers' outputs differ by at most "
             f"{report.max_abs_diff:.1e} on a test batch).", ""]
    if cfg.description:
        lines += [f"Recipe: {md_escape(cfg.description)}", ""]
    code = "\n".join(usage_code(cfg, exported, report))
    lines += ["## Use", "", fence(code, "python")[0], code, fence(code)[1], ""]
    lines += _notes(cfg, exported, report)
    lines += ["## Training", "", f"- steps: {report.step}", f"- images seen: {report.facts['images_seen']:,} "
              f"(batch {cfg.train.batch_size} x {report.facts['world_size']} process(es) per step)",
              f"- process: {cfg.diffusion.process}, prediction {cfg.diffusion.prediction}, "
              f"{cfg.diffusion.timesteps} timesteps", ""]
    lines += _metrics_lines(read_metrics(run_dir), read_evals(run_dir))
    resolved = cfg.to_yaml().rstrip()
    lines += ["<details><summary>Resolved training config</summary>", "", fence(resolved, "yaml")[0], resolved,
              fence(resolved)[1], "", "</details>", ""]
    return "\n".join(lines)


def _notes(cfg: Config, exported: Exported, report: ExportReport) -> list[str]:
    k, notes = cfg.model.num_classes or 0, []
    if k:
        notes.append(f"Class {k} is the null class (the unconditional model of classifier-free guidance); "
                     f"guidance scale 1 is the plain conditional model.")
    if cfg.diffusion.process == "ddpm" and cfg.sample.clip_x0 and report.scheduler not in ("DDPMScheduler", "DDIMScheduler"):
        notes.append(f"difftrain clips x0 to [-1, 1] while sampling (sample.clip_x0); {report.scheduler} does not.")
    if exported.target == "flux":
        notes.append("FLUX takes patches as tokens (packed channel-major) and multiplies the timestep by 1000.")
    if cfg.data.normalize != "none":
        notes.append(f"The model works on data normalised to unit variance: images = x * {cfg.data.std} + {cfg.data.mean}.")
    if cfg.latent.first_stage:
        notes.append(f"The model generates latents of the first stage {md_escape(cfg.latent.first_stage)}: decode x / "
                     f"{cfg.latent.scale_factor} with it.")
    return ([*(f"- {n}" for n in notes), ""] if notes else []) + ["`difftrain.json` holds these facts for programs.", ""]


def _metrics_lines(metrics: dict[str, tuple[int, float]], evals: dict[str, dict]) -> list[str]:
    if not metrics and not evals:
        return ["No metrics were logged.", ""]
    lines = ["## Metrics", "", "| metric | value | step / source |", "| --- | --- | --- |"]
    lines += [f"| {md_escape(key)} | {value:.6g} | {step} |" for key, (step, value) in metrics.items()]
    lines += [f"| {md_escape(key)} | {value:.6g} | {md_escape(name)} |"
              for name, values in evals.items() for key, value in values.items()]
    return lines + [""]


def usage_code(cfg: Config, exported: Exported, report: ExportReport) -> list[str]:
    """Python that samples the exported folder with diffusers alone (no difftrain import)."""
    folder, steps = str(report.out), cfg.sample.steps
    if report.pipeline:
        return [f"from diffusers import {report.pipeline}", "",
                f"pipe = {report.pipeline}.from_pretrained({folder!r})",
                f"images = pipe(batch_size=16, num_inference_steps={steps}).images  # PIL images"]
    k, flow = cfg.model.num_classes or 0, cfg.diffusion.process == "flow"
    sub = STEP_KEYS[exported.class_name]
    lines = ["import torch", *(["import torch.nn.functional as F"] if exported.target != "unet" and k else []),
             f"from diffusers import {report.scheduler}, {exported.class_name}", "",
             f'model = {exported.class_name}.from_pretrained({folder!r}, subfolder="{sub}").eval()',
             f'scheduler = {report.scheduler}.from_pretrained({folder!r}, subfolder="scheduler")']
    lines += _condition_lines(cfg, exported, k)
    if exported.target == "flux":
        lines += _flux_helpers(cfg, exported.patch_size)
    c, size = cfg.model.in_channels, cfg.model.image_size
    noise = "" if flow else " * scheduler.init_noise_sigma"
    lines += [f"scheduler.set_timesteps({steps})",
              f"x = torch.randn(len(labels), {c}, {size}, {size}, generator=torch.Generator().manual_seed(0)){noise}",
              "for t in scheduler.timesteps:"]
    clip = report.scheduler == "DDIMScheduler" and cfg.sample.clip_x0  # x0 clipped, eps recomputed, as difftrain
    return lines + _guided_body(_model_call(exported, k, flow), k, cfg, clip) + _output_lines(cfg)


def _condition_lines(cfg: Config, exported: Exported, k: int) -> list[str]:
    """labels (and the doubled cond/null inputs) for guidance; `labels` sets the batch size everywhere."""
    if not k:
        lines = ["labels = range(16)  # 16 samples"]
        if exported.target != "unet":
            lines.append("cond = dict(encoder_hidden_states=torch.zeros(16, 0, 1), pooled_projections=torch.zeros(16, 1))")
        return lines
    lines = [f"labels, scale = torch.arange({k}), {cfg.sample.guidance}  # class {k}: the null class"]
    both = f"torch.cat([labels, torch.full_like(labels, {k})])"
    if exported.target == "unet":
        return lines + [f"both = {both}"]
    lines.append(f"onehot = F.one_hot({both}, {k + 1}).float()")
    n = "len(onehot)"
    if cfg.model.class_embed == "token":
        return lines + [f"cond = dict(encoder_hidden_states=onehot[:, None], pooled_projections=torch.zeros({n}, 1))"]
    return lines + [f"cond = dict(encoder_hidden_states=torch.zeros({n}, 0, 1), pooled_projections=onehot)"]


def _model_call(exported: Exported, k: int, flow: bool) -> str:
    """One model call on the batch (doubled: conditional then null, with classes)."""
    x_in = "torch.cat([x, x])" if k else "x"
    if not flow:
        x_in = f"scheduler.scale_model_input({x_in}, t)"
    n = "2 * len(x)" if k else "len(x)"
    if exported.target == "unet":
        return f"model({x_in}, t{', class_labels=both' if k else ''}).sample"
    if exported.target == "sd3":
        return f"model({x_in}, timestep=t.expand({n}), **cond).sample"
    return (f"unpack(model(pack({x_in}), timestep=t.expand({n}) / 1000, img_ids=ids, "
            f"txt_ids=torch.zeros(cond['encoder_hidden_states'].shape[1], 2), **cond).sample)")


def _guided_body(call: str, k: int, cfg: Config, clip: bool) -> list[str]:
    """The loop body: the model call, guidance on the first C channels (a learned-variance model keeps its
    conditional variance channels), one scheduler step."""
    c = cfg.model.in_channels
    body = ["    with torch.no_grad():"]
    if k:
        body += [f"        cond_out, null_out = {call}.chunk(2)",
                 f"    out = null_out[:, :{c}] + scale * (cond_out[:, :{c}] - null_out[:, :{c}])"]
        if (cfg.model.out_channels or c) > c:
            body.append(f"    out = torch.cat([out, cond_out[:, {c}:]], dim=1)  # the learned variance, unguided")
    else:
        body += [f"        out = {call}"]
    return body + [f"    x = scheduler.step(out, t, x{', use_clipped_model_output=True' if clip else ''}).prev_sample"]


def _flux_helpers(cfg: Config, p: int) -> list[str]:
    """FLUX works on tokens: 2D patches packed channel-major, and the (row, col) position of each."""
    c, size = cfg.model.out_channels or cfg.model.in_channels, cfg.model.image_size
    g = size // p
    return [f"pack = lambda x: x.view(len(x), -1, {g}, {p}, {g}, {p}).permute(0, 2, 4, 1, 3, 5).reshape(len(x), {g * g}, -1)",
            f"unpack = lambda h: h.view(len(h), {g}, {g}, {c}, {p}, {p}).permute(0, 3, 1, 4, 2, 5)"
            f".reshape(len(h), {c}, {size}, {size})",
            f"ids = torch.stack(torch.meshgrid(torch.arange({g}), torch.arange({g}), indexing='ij'), -1).reshape(-1, 2).float()"]


def _output_lines(cfg: Config) -> list[str]:
    if cfg.latent.first_stage:
        return [f"latents = x / {cfg.latent.scale_factor}  # decode these with the first stage"]
    x = f"(x * {cfg.data.std} + {cfg.data.mean})" if cfg.data.normalize != "none" else "x"
    return [f"images = ({x} / 2 + 0.5).clamp(0, 1)  # (N, C, H, W) in [0, 1]"]
