"""Checks of config values: the type of each value (`coerce`) and its range (`validate`).

`coerce` turns a YAML or command-line value into a field's declared type. `validate` checks a
built config against RULES, one entry per numeric or list field, when the config is built
(`load_config`, `config_from_dict`), so a bad value fails before anything runs, with the key,
the valid range and the value: `train.lr: must be a finite number > 0, got -1`.

String choices (`diffusion.process`, `sample.sampler`, `train.lr_schedule`, ...) are checked
where they are used, by the registry or module that owns the list of valid names, which the
error lists; paths are checked when they are read. CHECKED_WHERE_USED names those keys, so
that a new field must be put in one list or the other (tests/test_reliability_inputs.py).

This module imports nothing from difftrain: config.py imports it.
"""

from __future__ import annotations

import argparse
import math
import re
import types
import typing
from collections.abc import Callable
from typing import Any, Union

MAX_SEED = 2**32 - 1  # numpy and scikit-learn take seeds below 2**32
MAX_SIDE = 8192  # image sides: 8192 x 8192 RGB is 200 MB a picture, beyond any data set used with diffusion models


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key and what is valid."""


# --- types ------------------------------------------------------------------------------------

def type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(hint))
    if origin is list:
        return f"list of {type_name(typing.get_args(hint)[0])}"
    return "null" if hint is type(None) else hint.__name__


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Return `value` as type `hint`, or raise ConfigError naming the key."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(hint):
            try:
                return coerce(value, arg, key)
            except ConfigError:
                continue
    elif origin is list:
        if isinstance(value, (list, tuple)):
            (item,) = typing.get_args(hint)
            return [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    elif hint is type(None):
        if value is None:
            return None
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{key}: expected {type_name(hint)}, got {value!r} ({type(value).__name__})")


# --- ranges -----------------------------------------------------------------------------------

Rule = tuple[Callable[[Any], bool], str]  # (test of a value, what a valid value is)


def _real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(lo: int, hi: int | None = None, *, null: bool = False, note: str = "") -> Rule:
    """An integer in lo..hi (no upper bound when hi is None), or null when `null`."""
    text = f"an integer >= {lo}" if hi is None else f"an integer in {lo}..{hi}"
    return (lambda v: (null and v is None) or (isinstance(v, int) and not isinstance(v, bool) and lo <= v
                                               and (hi is None or v <= hi)),
            text + note + (" or null" if null else ""))


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False,
           null: bool = False) -> Rule:
    """A finite number in the interval between lo and hi (open ends when asked), or null when `null`."""
    def test(v: Any) -> bool:
        if v is None:
            return null
        return (_real(v) and (lo is None or (v > lo if lo_open else v >= lo))
                and (hi is None or (v < hi if hi_open else v <= hi)))

    if lo is not None and hi is not None:
        text = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    elif lo is not None:
        text = f"a finite number {'>' if lo_open else '>='} {lo:g}"
    else:
        text = "a finite number"
    return test, text + (" or null" if null else "")


def each(rule: Rule, text: str, *, empty: bool = True, length: int | None = None) -> Rule:
    """A list whose items all pass `rule`: non-empty unless `empty`, of exactly `length` items when given."""
    return (lambda v: isinstance(v, list) and (empty or bool(v)) and (length is None or len(v) == length)
            and all(rule[0](x) for x in v), text)


def _interval(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(_real(x) for x in v) and 0 <= v[0] <= v[1] <= 1


def _sigma_interval(v: Any) -> bool:
    return v is None or (isinstance(v, list) and len(v) == 2 and _real(v[0]) and isinstance(v[1], (int, float))
                         and not isinstance(v[1], bool) and 0 <= v[0] <= v[1])  # hi may be inf (nan fails <=)


# The guidance intervals' one home: the config rules, the CLI options and the sampling plan check these.
T_INTERVAL: Rule = (_interval, "[lo, hi] with 0 <= lo <= hi <= 1 (fractions t / T of the model's time)")
GUIDES = ("cfg", "auto", "none")  # sample.guide, --guide: what the guidance weight mixes with (samplers/guidance.py)
GUIDE: Rule = (lambda v: v in GUIDES, "one of " + ", ".join(GUIDES))
SIGMA_INTERVAL: Rule = (_sigma_interval, "[lo, hi] with 0 <= lo <= hi (noise levels sigma; hi may be inf), or null")


def _rates(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(UNIT[0](x) for x in v) and len(set(v)) == len(v)


BUDGET_TEXT = "a time like 30s, 10m, 2h or an image count like 2M_images"
_TIME = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(s|m|min|h|)")  # 90 (seconds), 30s, 10m, 1.5h
_IMAGES = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([kKmM]?)_images")  # 60000_images, 500k_images, 2M_images
_SECONDS = {"": 1, "s": 1, "m": 60, "min": 60, "h": 3600}
_THOUSANDS = {"": 1, "k": 10**3, "m": 10**6}


def parse_budget(text: str) -> tuple[str, float]:
    """train.budget as ("seconds", s), ("images", n) or ("", 0) when empty (off); ConfigError otherwise."""
    text = text.strip()
    if not text:
        return "", 0
    if (m := _TIME.fullmatch(text)) and float(m[1]) * _SECONDS[m[2]] > 0:
        return "seconds", float(m[1]) * _SECONDS[m[2]]
    if m := _IMAGES.fullmatch(text):
        images = float(m[1]) * _THOUSANDS[m[2].lower()]
        if images >= 1 and images.is_integer():
            return "images", int(images)
    raise ConfigError(f"train.budget: must be {BUDGET_TEXT}, got '{text}'")


def _budget(v: Any) -> bool:
    try:
        parse_budget(v)
    except (ConfigError, AttributeError):
        return False
    return True


def _widths(v: Any) -> bool:  # post-hoc EMA widths: below 1/sqrt(12), the width of a uniform average
    return isinstance(v, list) and all(_real(x) and 0 < x < 0.2886 for x in v) and len(set(v)) == len(v)


COUNT = integer(1)
OFF_OR_COUNT = integer(0, note=" (0: off)")
SEED = integer(0, MAX_SEED)
UNIT = number(0, 1, hi_open=True)  # dropout, decay and EMA rates
WEIGHT = number(0)  # loss weights
SIZE_OR_NULL = integer(1, null=True)
SIDE = integer(1, MAX_SIDE)

RULES: dict[str, Rule] = {
    "run_dir": (lambda v: isinstance(v, str) and bool(v.strip()), "a folder path (not empty)"),
    # model
    "model.model_channels": COUNT,
    "model.channel_mult": each(COUNT, "a non-empty list of integers >= 1", empty=False),
    "model.num_res_blocks": integer(0),
    "model.attention_resolutions": each(COUNT, "a list of integers >= 1 (downsampling factors)"),
    "model.num_heads": COUNT,
    "model.num_head_channels": (lambda v: v == -1 or COUNT[0](v), "-1 (use model.num_heads) or an integer >= 1"),
    "model.dropout": UNIT,
    "model.norm_groups": COUNT,
    "model.in_channels": SIZE_OR_NULL,
    "model.image_size": integer(1, MAX_SIDE, null=True),
    "model.num_classes": integer(0, null=True, note=" (0: unconditional)"),
    "model.out_channels": SIZE_OR_NULL,
    "model.hidden_size": COUNT,
    "model.depth": COUNT,
    "model.patch_size": COUNT,
    "model.mlp_ratio": number(0, lo_open=True),
    "model.time_freq_shift": number(0, 1),
    "model.mlp_norm_eps": number(0, lo_open=True),
    # diffusion
    "diffusion.timesteps": COUNT,
    "diffusion.beta_start": number(0, 1, lo_open=True, hi_open=True),
    "diffusion.beta_end": number(0, 1, lo_open=True, hi_open=True),
    "diffusion.vlb_weight": WEIGHT,
    "diffusion.logit_mean": number(),
    "diffusion.logit_std": number(0, lo_open=True),
    "diffusion.mode_scale": number(),
    "diffusion.shift": number(0, lo_open=True),
    "diffusion.snr_gamma": number(0, lo_open=True),
    "diffusion.offset_noise": number(0),
    "diffusion.sigma_data": number(0, lo_open=True),
    "diffusion.p_mean": number(),
    "diffusion.p_std": number(0, lo_open=True),
    "diffusion.sigma_min": number(0, lo_open=True),
    "diffusion.sigma_max": number(0, lo_open=True),
    "diffusion.rho": number(0, lo_open=True),
    # data
    "data.image_size": SIDE,
    "data.channels": (lambda v: v in (None, 1, 3) and not isinstance(v, bool), "1, 3 or null (the data set's own)"),
    "data.test_fraction": UNIT,
    "data.split_seed": SEED,
    "data.num_workers": integer(0),
    "data.prefetch": COUNT,
    "data.black_white": integer(0),
    "data.mean": number(null=True),
    "data.std": number(0, lo_open=True, null=True),
    # train
    "train.steps": COUNT,
    "train.budget": (_budget, BUDGET_TEXT + ", or empty (off: train.steps)"),
    "train.batch_size": COUNT,
    "train.microbatch": integer(0, note=" (0: the whole batch)"),
    "train.lr": number(0, lo_open=True),
    "train.seed": SEED,
    "train.warmup_steps": integer(0),
    "train.lr_anneal_steps": integer(0, note=" (0: at train.steps)"),
    "train.weight_decay": number(0),
    "train.betas": each(UNIT, "two numbers in [0, 1), e.g. [0.9, 0.999]", length=2),
    "train.grad_clip": number(0),
    "train.ema_rates": (_rates, "a non-empty list of distinct rates in [0, 1), e.g. [0.9999, 0.999]"),
    "train.ema_rate": number(0, 1, hi_open=True, null=True),
    "train.ema_start": integer(0),
    "train.posthoc_ema": (_widths, "a list of distinct widths sigma_rel in (0, 0.2886), e.g. [0.05, 0.1] ([]: off)"),
    "train.ema_snapshot_every": integer(0, note=" (0: train.steps // 20)"),
    "train.label_dropout": UNIT,
    "train.max_nonfinite": COUNT,
    "train.log_every": COUNT,
    "train.val_every": OFF_OR_COUNT,
    "train.checkpoint_every": OFF_OR_COUNT,
    "train.milestone_every": OFF_OR_COUNT,
    "train.sample_every": OFF_OR_COUNT,
    "train.eval_every": OFF_OR_COUNT,
    "train.eval_samples": integer(2),
    "train.eval_steps": integer(0, note=" (0: sample.steps)"),
    "train.keep_checkpoints": integer(0, note=" (0: keep every checkpoint)"),
    "train.devices": COUNT,
    # sample
    "sample.steps": COUNT,
    "sample.guidance": number(),
    "sample.guide": GUIDE,
    "sample.guidance_interval": T_INTERVAL,
    "sample.guidance_interval_sigma": SIGMA_INTERVAL,
    "sample.eta": number(0),
    "sample.batch_size": COUNT,
    # autoencoder
    "autoencoder.ch": COUNT,
    "autoencoder.ch_mult": each(COUNT, "a non-empty list of integers >= 1", empty=False),
    "autoencoder.num_res_blocks": integer(0),
    "autoencoder.attn_resolutions": each(COUNT, "a list of integers >= 1 (feature-map sides)"),
    "autoencoder.dropout": UNIT,
    "autoencoder.z_channels": COUNT,
    "autoencoder.embed_dim": COUNT,
    "autoencoder.resolution": integer(1, MAX_SIDE, null=True),
    "autoencoder.n_embed": COUNT,
    "autoencoder.beta": WEIGHT,
    "autoencoder.ema_decay": UNIT,
    "autoencoder.restart_every": OFF_OR_COUNT,
    "autoencoder.codebook_weight": WEIGHT,
    "autoencoder.kl_weight": WEIGHT,
    "autoencoder.lpips_weight": WEIGHT,
    "autoencoder.disc_weight": WEIGHT,
    "autoencoder.disc_start": integer(0),
    "autoencoder.disc_layers": COUNT,
    "autoencoder.disc_channels": COUNT,
    "autoencoder.disc_lr": number(0, lo_open=True, null=True),
    # latent
    "latent.scale_factor": number(0, lo_open=True, null=True),
    "latent.encode_batch_size": COUNT,
}

# Strings and booleans: choices are checked (and listed) by the code that uses them; paths when read.
CHECKED_WHERE_USED = frozenset({
    "recipe", "description",
    "model.name", "model.init_from", "model.use_scale_shift_norm", "model.resblock_updown", "model.class_embed",
    "model.pos_embed", "model.qk_norm", "model.cond_embed", "model.weight_init",
    "diffusion.process", "diffusion.schedule", "diffusion.prediction", "diffusion.learn_sigma",
    "diffusion.timestep_sampling", "diffusion.loss_weighting", "diffusion.zero_terminal_snr",
    "data.name", "data.path", "data.random_flip", "data.class_from", "data.strict", "data.test_path", "data.download",
    "data.normalize", "data.image_column", "data.label_column",
    "train.task", "train.scale_lr", "train.lr_schedule", "train.ema_warmup", "train.timestep_sampler", "train.precision",
    "train.compile", "train.parallel", "train.activation_checkpointing", "train.channels_last", "train.resume",
    "train.device", "train.tensorboard", "train.wandb",
    "train.progress", "train.allow_config_change", "train.eval_sampler",
    "sample.sampler", "sample.guide_weights", "sample.spacing", "sample.respacing", "sample.variance", "sample.clip_x0",
    "autoencoder.kind", "autoencoder.codebook", "autoencoder.rec_loss", "autoencoder.lpips_required",
    "autoencoder.adaptive_weight",
    "latent.first_stage", "latent.first_stage_weights", "latent.posterior", "latent.cache", "latent.cache_path",
})


def _show(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return "null" if value is None else str(value)


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


# --- credentials in URLs -----------------------------------------------------------------------

def credentials_in(spec: Any) -> bool:
    """Whether a data path or URL carries what may be a secret: a user name or password (user:pw@host) or a
    query string (?token=..., presigned ?X-Amz-Signature=...). Such a value would be written to config.yaml,
    every checkpoint, the report and the logs, so it is refused (README "Data from object storage and the Hub")."""
    if not isinstance(spec, str) or "://" not in spec:
        return False
    for part in spec.split(","):
        scheme, _, rest = part.strip().partition("://")
        if not scheme:
            continue
        netloc = rest.split("/", 1)[0]
        if "@" in netloc or "?" in rest:
            return True
    return False


def redact(spec: str) -> str:
    """`spec` with user names, passwords and query strings of its URLs replaced by '***'."""
    out = []
    for part in spec.split(","):
        scheme, sep, rest = part.partition("://")
        if sep:
            netloc, slash, path = rest.partition("/")
            netloc = "***@" + netloc.rsplit("@", 1)[1] if "@" in netloc else netloc
            path = path.split("?", 1)[0] + "?***" if "?" in path else path
            netloc = netloc.split("?", 1)[0] + "?***" if "?" in netloc else netloc
            part = scheme + sep + netloc + slash + path
        out.append(part)
    return ",".join(out)


CREDENTIALS_TEXT = ("a URL carrying credentials (user:password@ or a ?query) is refused: it would be written to "
                    "config.yaml, the checkpoints, the report and the logs; give credentials the filesystem's usual way "
                    "(s3: AWS_ACCESS_KEY_ID / AWS_PROFILE or ~/.aws, gs: GOOGLE_APPLICATION_CREDENTIALS, hf: HF_TOKEN "
                    "or `huggingface-cli login`, http(s): ~/.netrc)")


def problems(cfg: Any) -> list[str]:
    """One line per out-of-range value of `cfg` (a difftrain Config): `key: must be ..., got VALUE`."""
    lines = [f"{key}: must be {text}, got {_show(_get(cfg, key))}"
             for key, (test, text) in RULES.items() if not test(_get(cfg, key))]
    for key in ("data.path", "data.test_path"):  # the value itself is not shown: only its redacted form
        if credentials_in(_get(cfg, key)):
            lines.append(f"{key}: {CREDENTIALS_TEXT}; got {redact(_get(cfg, key))}")
    d = cfg.diffusion
    if _real(d.beta_start) and _real(d.beta_end) and d.beta_start > d.beta_end:
        lines.append(f"diffusion.beta_start: must be <= diffusion.beta_end ({_show(d.beta_end)}), got {_show(d.beta_start)}")
    if _real(d.sigma_min) and _real(d.sigma_max) and d.sigma_min >= d.sigma_max:
        lines.append(f"diffusion.sigma_min: must be < diffusion.sigma_max ({_show(d.sigma_max)}), got {_show(d.sigma_min)}")
    clash = interval_clash(cfg.sample.guidance_interval_sigma, cfg.sample.guidance_interval)
    if clash:
        lines.append(clash)
    return lines


def interval_clash(sigma_interval: Any, t_interval: Any) -> str:
    """The problem when both guidance intervals are set (sigma and the older t / T), else ''."""
    if sigma_interval is not None and t_interval != [0, 1]:
        return (f"sample.guidance_interval_sigma: set together with sample.guidance_interval {_show(t_interval)} "
                f"(t / T); give one of them")
    return ""


def check_value(key: str, value: Any) -> Any:
    """`value`, or a ConfigError `key: must be ..., got VALUE` by RULES[key] (a value set after the config was built)."""
    test, text = RULES[key]
    if not test(value):
        raise ConfigError(f"{key}: must be {text}, got {_show(value)}")
    return value


def validate(cfg: Any) -> Any:
    """`cfg`, or a ConfigError listing every out-of-range value (RULES)."""
    found = problems(cfg)
    if found:
        raise ConfigError("\n".join(found) if len(found) == 1 else "bad config values:\n  " + "\n  ".join(found))
    return cfg


# --- command-line options ---------------------------------------------------------------------

def option(parse: Callable[[str], Any], rule: Rule) -> Callable[[str], Any]:
    """An argparse `type=`: the text parsed by `parse`, then checked against `rule`; argparse prints
    `argument --n: must be an integer >= 1, got 0` and exits with status 2 otherwise."""
    test, text = rule

    def convert(raw: str) -> Any:
        try:
            value = parse(raw)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"must be {text}, got '{raw}'") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"must be {text}, got {raw}")
        return value

    return convert


COUNT_OPTION = option(int, COUNT)  # --n, --steps, --batch-size, ...
OFF_OR_COUNT_OPTION = option(int, integer(0, note=" (0: all)"))  # --limit, --max-fonts
SEED_OPTION = option(int, SEED)
SIDE_OPTION = option(int, SIDE)  # --image-size
PER_CLASS_OPTION = option(int, integer(1, 256))  # preview images per class
FONT_SIZE_OPTION = option(int, integer(1, 512))  # letters are drawn at 4x first, on a canvas 3x wider again
EMOJI_SIZES = (32, 64, 128)  # the 136 x 128 colour bitmaps, padded square, downscaled
EMOJI_SIZE_OPTION = option(int, (lambda v: v in EMOJI_SIZES, "one of " + ", ".join(map(str, EMOJI_SIZES))))
NUMBER_OPTION = option(float, number())  # --guidance: any finite number
NONNEGATIVE_OPTION = option(float, number(0))  # --eta


def _pair(text: str) -> list[float]:
    """`0.2,0.8` -> [0.2, 0.8] (`inf` reads as infinity)."""
    lo, hi = text.split(",")
    return [float(lo), float(hi)]


SIGMA_INTERVAL_OPTION = option(_pair, SIGMA_INTERVAL)  # --guidance-interval SIGMA_LO,SIGMA_HI
T_INTERVAL_OPTION = option(_pair, T_INTERVAL)  # --guidance-interval-t LO,HI

