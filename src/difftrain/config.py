"""Typed run configuration: dataclasses, YAML recipes and `key=value` overrides.

A config is built in three layers: the dataclass defaults, a recipe (a YAML file shipped
in `difftrain/recipes/` or any path), then `section.key=value` overrides from the command
line. Every value is checked against the field's declared type, and the built config
against the ranges in config_checks.py; an unknown key is an error naming the closest valid
key. The resolved config is written next to the run and stored inside every checkpoint, so a
run directory is self-describing. Resolution (training/resolve.py) returns a new config and freezes
it (`freeze`: assigning a key of a frozen config raises FrozenInstanceError; `thaw`: a writable copy).
"""

from __future__ import annotations

import copy as _copy
import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from difftrain.config_checks import ConfigError, coerce, validate  # noqa: F401 (ConfigError is imported from here)
from difftrain.safe_yaml import YAMLLimitError, load_yaml, read_yaml_text


class Section:
    """A config section; once `freeze` has run on its config, assigning a field raises FrozenInstanceError.

    The flag lives in the instance's __dict__ (not a field): to_dict / to_yaml / == ignore it, and copy.deepcopy
    keeps it, so a copy of a resolved config is frozen too (`thaw` makes a writable one)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get("_frozen", False):
            raise dataclasses.FrozenInstanceError(
                f"cannot set {type(self).__name__}.{name}: the config is resolved (frozen); resolve a new one "
                f"(training/resolve.py) instead of completing it in place")
        super().__setattr__(name, value)


@dataclass
class ModelConfig(Section):
    name: str = "adm_unet"
    model_channels: int = 64
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2])
    num_res_blocks: int = 2
    # Downsampling factors at which self-attention is used (LDM convention): 2 means
    # the resolution image_size / 2.
    attention_resolutions: list[int] = field(default_factory=lambda: [2])
    num_heads: int = 4
    num_head_channels: int = -1  # > 0 overrides num_heads with channels // this
    dropout: float = 0.0
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False
    norm_groups: int = 32  # capped at the largest divisor of the channel count
    # Filled from the data set when left at null: image channels, side and class count.
    in_channels: int | None = None
    image_size: int | None = None
    num_classes: int | None = None
    out_channels: int | None = None  # null: in_channels, or 2 x in_channels with diffusion.learn_sigma
    # DiT (model.name=dit; the presets dit_s_2 ... dit_xl_8, dit_tiny_2 fix depth, hidden_size,
    # num_heads and patch_size): a transformer over patch_size x patch_size patches.
    hidden_size: int = 256
    depth: int = 3
    patch_size: int = 2
    mlp_ratio: float = 4.0
    class_embed: str = "token"  # token (one extra sequence token) | adaln (added to the timestep embedding)
    pos_embed: str = "rope"  # rope (2D axial rotary, FLUX-like) | sincos (fixed 2D sin-cos) | sincos_dit (DiT's layout)
    qk_norm: bool = False  # RMSNorm on queries and keys per head
    # diffusers' DiTTransformer2DModel is class_embed=adaln, pos_embed=sincos_dit (DiT/MAE's sin-cos layout),
    # cond_embed=per_block, time_freq_shift=1, mlp_norm_eps=1e-5, weight_init=torch (models/dit.py).
    cond_embed: str = "shared"  # shared (one timestep + label embedder) | per_block (one in every block)
    time_freq_shift: float = 0.0  # timestep frequencies 10000^(-i / (128 - shift)): diffusers' downscale_freq_shift
    mlp_norm_eps: float = 1e-6  # epsilon of each block's second LayerNorm (before the MLP)
    weight_init: str = "dit"  # dit (xavier, adaLN-Zero, zero output) | torch (PyTorch's default of every layer)
    # Start from these weights: a run directory or checkpoint .pt (its EMA weights), a safetensors file of ours,
    # or a diffusers folder (UNet2DModel, or an export's unet/ / transformer/). A resumed checkpoint wins.
    init_from: str | None = None


@dataclass
class DiffusionConfig(Section):
    process: str = "ddpm"  # ddpm | flow | edm
    timesteps: int = 1000  # flow: the model sees t = sigma * timesteps (diffusers' num_train_timesteps)
    schedule: str = "linear"  # linear | sqrt_linear | cosine
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction: str = "eps"  # eps | x0 | v
    zero_terminal_snr: bool = False  # ddpm: betas rescaled to alpha_bar_T = 0 (Lin et al. 2024); needs prediction v or x0
    # improved DDPM / guided-diffusion: the model also outputs the variance interpolation (2 x channels),
    # trained by L_simple + vlb_weight * timesteps * L_vlb (mean under stop-gradient).
    learn_sigma: bool = False
    vlb_weight: float = 0.001
    # flow (rectified flow, SD3 report): how training draws sigma, the SD3 shift, loss weighting.
    timestep_sampling: str = "logit_normal"  # logit_normal | uniform | mode
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float = 1.0  # sigma -> shift * sigma / (1 + (shift - 1) * sigma), in training and sampling
    loss_weighting: str = "none"  # flow: none | sigma_sqrt | cosmap; ddpm: none | min_snr (Hang et al. 2023)
    snr_gamma: float = 5.0  # min_snr: the loss weight is min(SNR, gamma) in x0 space
    offset_noise: float = 0.0  # training noise += offset_noise * N(0, 1) per image and channel (Guttenberg 2023)
    # edm (Karras et al. 2022): data std of the preconditioning, training ln(sigma) ~ N(p_mean, p_std^2),
    # sampling sigmas from sigma_max to sigma_min spaced by rho; the model sees t = timesteps (ln(sigma) / 16 + 1 / 2)
    sigma_data: float = 0.5
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0


@dataclass
class DataConfig(Section):
    name: str = "digits"  # digits | folder | mnist | fashion_mnist | cifar10 | cifar100 | celebahq | fonts | shards | parquet
    path: str | None = None  # folder / file / shard / parquet source, local or a URL (s3://, gs://, hf://, https://)
    image_size: int = 8
    channels: int | None = None  # null: the data set's own (1 for digits, 3 for folders)
    test_fraction: float = 0.3
    split_seed: int = 0
    random_flip: bool = False
    class_from: str = "auto"  # auto | dir | prefix | none (folder data sets)
    strict: bool = False  # folder: fail on the first unreadable image instead of skipping
    test_path: str | None = None  # shards: validation shards (read into memory); other sources split their own
    num_workers: int = 0  # shards: worker processes decoding shards ahead of use (0: in the training process)
    prefetch: int = 2  # shards: shards each worker decodes ahead
    image_column: str = "image"  # parquet: the column of encoded images (the Hub's {bytes, path} struct or binary)
    label_column: str | None = None  # parquet: the class column (null: unlabelled)
    download: bool = False  # mnist / fashion_mnist / cifar10 / cifar100: fetch the files into data.path when missing
    black_white: int = 0  # add this many all-black and as many all-white images (null class) to the training split
    # unit_variance: training images (in [-1, 1]) become (x - mean) / std; sampling inverts it.
    # mean and std are filled from the training split when null and stored with the run.
    normalize: str = "none"  # none | unit_variance
    mean: float | None = None
    std: float | None = None


@dataclass
class TrainConfig(Section):
    task: str | None = "auto"  # diffusion | autoencoder (training/tasks TASKS) | auto / null: from autoencoder.kind
    steps: int = 1000
    budget: str = ""  # replaces steps: wall time (30s, 10m, 2h; lr decay ends there) or images (2M_images); "": off
    batch_size: int = 128
    microbatch: int = 0  # > 0: split each batch into micro-batches of this size, accumulating gradients
    lr: float = 2e-3
    scale_lr: bool = False  # LDM: lr = lr x batch_size x world size (the batch includes its micro-batches)
    seed: int = 0
    warmup_steps: int = 100
    lr_schedule: str = "constant"  # constant | linear | cosine | onecycle
    lr_anneal_steps: int = 0  # linear / cosine reach 0 here (0: at train.steps)
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    ema_rates: list[float] = field(default_factory=lambda: [0.999])  # one EMA per rate; the first is the default
    ema_rate: float | None = None  # deprecated single rate: same as ema_rates=[ema_rate]
    ema_warmup: bool = True  # decay min(rate, (1 + n) / (10 + n)) as in LDM
    ema_start: int = 0  # before this step the EMAs copy the weights (conditional-DDPM reference: 2000)
    # post-hoc EMA (EDM2, Karras et al. 2024): power-function EMAs of these widths sigma_rel, e.g. [0.05, 0.1];
    # snapshots every ema_snapshot_every steps (0: train.steps // 20) in RUN/ema-snapshots/ for `difftrain ema`
    posthoc_ema: list[float] = field(default_factory=list)
    ema_snapshot_every: int = 0
    # process (the process's own sample_t) | loss-second-moment (guided-diffusion's schedule_sampler);
    # uniform: the old name of process (for flow and edm it never was uniform)
    timestep_sampler: str = "process"
    label_dropout: float = 0.1  # fraction of labels replaced by the null class
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16: a dynamic loss scaler; on a CPU only with train.device=cpu, slow)
    compile: bool = False  # torch.compile the model for training
    # under torchrun: ddp (every rank a full copy) | fsdp (FSDP2: gradients and optimizer state sharded per block)
    parallel: str = "ddp"
    activation_checkpointing: bool = False  # recompute each block's activations in backward (torch.utils.checkpoint)
    channels_last: bool = False  # channels-last memory format (convolutional models)
    max_nonfinite: int = 10  # stop after this many non-finite losses in a row
    log_every: int = 25
    val_every: int = 0  # validation loss on the held-out split every N steps; 0 disables
    checkpoint_every: int = 500
    milestone_every: int = 0  # checkpoints at multiples of this are never pruned; 0: none
    sample_every: int = 500  # 0 disables grids during training (the final grid is always written)
    # sample quality during training (training/evaluate.py): every N steps and at the end, score
    # eval_samples samples of the default EMA (classifier metric where the data set has one; FID/KID with
    # torch-fidelity and its Inception weights on disk); the best keeps checkpoints/best.pt. 0: off
    eval_every: int = 0
    eval_samples: int = 500
    eval_sampler: str = ""  # "": sample.sampler
    eval_steps: int = 0  # 0: sample.steps
    keep_checkpoints: int = 3
    resume: str = "auto"  # auto | none | restart (move a trained run aside to RUN/abandoned-TIME/) | path to a checkpoint
    allow_config_change: bool = False  # resume even when diffusion, model or image-shape keys differ from the checkpoint's
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # > 1: `difftrain train` starts torchrun with this many processes on this machine (batch_size is per process)
    devices: int = 1
    tensorboard: bool = True
    wandb: str = "none"  # none | online | offline (Weights & Biases; needs the wandb package)
    progress: bool = True


@dataclass
class SampleConfig(Section):
    """Defaults for sample grids written during training and by `difftrain sample`."""

    sampler: str = "ddim"  # ddpm | ddim | euler | heun | dpmpp-2m | dpmpp-2m-sde (process ddpm); euler | heun (process flow)
    steps: int = 50
    spacing: str = "trailing"  # leading | trailing | linspace | karras (Karras et al. 2022 sigmas, rho 7)
    respacing: str = ""  # guided-diffusion's timestep_respacing ("250", "ddim50", "10,15,20"); overrides steps/spacing
    variance: str = "auto"  # ddpm: small | large | learned; auto = learned with diffusion.learn_sigma, else small
    guidance: float = 3.0  # guidance weight w; 1 = conditional only, 0 = unconditional (cfg) / the guide alone (auto)
    # cfg: classifier-free, D_u + w (D_c - D_u); auto: autoguidance (Karras et al. 2024), D_g + w (D_c - D_g) with
    # the guide model of guide_weights; none: the conditional model alone
    guide: str = "cfg"
    guide_weights: str = ""  # guide=auto: ema-RATE / raw / phema-SIGMA of the run, a checkpoint .pt or a .safetensors
    # guide only where lo < sigma <= hi, the sampler's noise level (Kynkaanniemi et al. 2024, EDM2); null: everywhere
    guidance_interval_sigma: list[float] | None = None
    # the older form, in the model's time: guide only for t / T in [lo, hi] (kept, so old runs mean what they meant)
    guidance_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])
    eta: float = 0.0
    clip_x0: bool = True
    batch_size: int = 250


@dataclass
class AutoencoderConfig(Section):
    """First stage of latent diffusion (LDM / taming names). kind=none: the run trains a diffusion model."""

    kind: str = "none"  # none | vq | kl: vq / kl make the run train this autoencoder instead of a diffusion model
    ch: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 4])  # downsampling factor f = 2 ** (len - 1)
    num_res_blocks: int = 2
    attn_resolutions: list[int] = field(default_factory=list)  # feature-map sides with self-attention (LDM convention)
    dropout: float = 0.0
    z_channels: int = 3
    embed_dim: int = 3  # latent channels (after quant_conv)
    resolution: int | None = None  # null: data.image_size (must equal it)
    n_embed: int = 8192  # vq: codebook entries
    beta: float = 0.25  # vq: commitment weight
    codebook: str = "straight_through"  # straight_through (codebook loss) | ema (VQ-VAE-2 codebook updates)
    ema_decay: float = 0.99  # codebook=ema
    restart_every: int = 0  # vq: every N steps re-initialise codes unused since the last check from batch encodings; 0: never
    codebook_weight: float = 1.0
    kl_weight: float = 1.0e-6  # kl
    rec_loss: str = "l1"  # l1 | l2
    lpips_weight: float = 0.0  # > 0 needs the lpips package and its VGG weights on disk (never downloaded)
    lpips_required: bool = True  # false: warn once and train without LPIPS when its weights are missing
    disc_weight: float = 0.0  # patch-GAN generator loss weight (times taming's adaptive weight); 0: no discriminator
    disc_start: int = 0  # step at which the discriminator and its loss switch on
    disc_layers: int = 3
    disc_channels: int = 64
    disc_lr: float | None = None  # null: the generator's learning rate
    adaptive_weight: bool = True  # taming/LDM: scale the GAN loss by |grad rec| / |grad gan| at the decoder's last layer


@dataclass
class LatentConfig(Section):
    """Latent diffusion: train the diffusion model on a first stage's latents and decode its samples."""

    first_stage: str | None = None  # difftrain autoencoder run dir, or a diffusers AutoencoderKL / VQModel directory
    first_stage_weights: str = "raw"  # difftrain runs: raw | ema
    scale_factor: float | None = None  # null: 1 / std of the training latents (LDM scale_by_std), stored with the run
    posterior: str = "mode"  # kl first stages: mode | sample (one draw, fixed when cached)
    cache: bool = False  # encode the data set once to a file and train from it
    cache_path: str | None = None  # null: $DIFFTRAIN_CACHE/latents/KEY.pt, KEY from the first stage and data config
    encode_batch_size: int = 64


@dataclass
class Config(Section):
    run_dir: str = "runs/default"
    recipe: str = ""  # the recipe this config was built from (informational)
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False, width=120)


class _Dumper(yaml.SafeDumper):
    """Safe YAML with lists of scalars on one line: `channel_mult: [1, 2, 2]`."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


# --- building a config -------------------------------------------------------------

def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        sub = _dataclass_type(cls, f.name)
        if sub is not None:
            keys.extend(_all_keys(sub, f"{prefix}{f.name}."))
        else:
            keys.append(prefix + f.name)
    return keys


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _dataclass_type(cls: type, name: str) -> type | None:
    hint = _hints(cls)[name]
    return hint if dataclasses.is_dataclass(hint) else None


def _unknown_key(key: str) -> ConfigError:
    valid = _all_keys(Config)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not close:  # a bare name may match the last part of a dotted key
        tails = {k.rsplit(".", 1)[-1]: k for k in valid}
        hit = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(tails), n=1, cutoff=0.6)
        close = [tails[hit[0]]] if hit else []
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint} (`difftrain train RECIPE --dry-run` lists all keys)")


def set_key(cfg: Config, key: str, value: Any) -> None:
    """Set the dotted `key` of `cfg` to `value`, type-checked."""
    obj: Any = cfg
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            raise _unknown_key(key)
        sub = _dataclass_type(type(obj), part)
        if i == len(parts) - 1:
            if sub is not None:
                if not isinstance(value, dict):
                    raise ConfigError(f"{key}: is a section; set its keys, e.g. {key}.{dataclasses.fields(sub)[0].name}=...")
                for k, v in value.items():
                    set_key(cfg, f"{key}.{k}", v)
                return
            setattr(obj, part, coerce(value, _hints(type(obj))[part], key))
            return
        obj = getattr(obj, part)


def apply_dict(cfg: Config, data: dict[str, Any], prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            apply_dict(cfg, v, f"{key}.")
        else:
            set_key(cfg, key, v)


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=1e-4` -> ("train.lr", 0.0001); values are read as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML reads 1e-4 as a string (it wants 1.0e-4); accept plain float syntax too.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    return key.strip(), value


def recipe_names() -> list[str]:
    folder = resources.files("difftrain") / "recipes"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def recipe_text(name: str) -> str:
    return (resources.files("difftrain") / "recipes" / f"{name}.yaml").read_text()


def _read_recipe(recipe: str) -> tuple[str, dict[str, Any]]:
    path = Path(recipe)
    if recipe.endswith((".yaml", ".yml")) or path.exists():
        if not path.is_file():
            raise ConfigError(f"recipe file '{recipe}' does not exist")
        try:
            text, name = read_yaml_text(path), path.stem
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"recipe '{recipe}' cannot be read: {getattr(e, 'strerror', None) or e}") from None
    elif recipe in recipe_names():
        text, name = recipe_text(recipe), recipe
    else:
        close = difflib.get_close_matches(recipe, recipe_names(), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown recipe '{recipe}'{hint} (choose from {', '.join(recipe_names())}, or give a .yaml path)")
    try:
        data = load_yaml(text) or {}
    except YAMLLimitError as e:
        raise ConfigError(f"recipe '{recipe}' is refused: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe '{recipe}' is not valid YAML: {e}") from None
    return name, data


def load_config(recipe: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the recipe (name or YAML path), then `key=value` overrides."""
    cfg = Config()
    if recipe:
        name, data = _read_recipe(recipe)
        cfg.run_dir = f"runs/{name}"
        cfg.recipe = name
        try:
            apply_dict(cfg, data)
        except ConfigError as e:
            raise ConfigError(f"recipe '{recipe}': {e}") from None
    for text in overrides:
        set_key(cfg, *parse_override(text))
    return validate(cfg)


def _sections(cfg: Config) -> list[Section]:
    return [cfg, *(getattr(cfg, f.name) for f in dataclasses.fields(cfg) if isinstance(getattr(cfg, f.name), Section))]


def freeze(cfg: Config) -> Config:
    """Make `cfg` and its sections read-only (assignment raises FrozenInstanceError); returns it."""
    for section in _sections(cfg):
        object.__setattr__(section, "_frozen", True)
    return cfg


def is_frozen(cfg: Config) -> bool:
    return bool(cfg.__dict__.get("_frozen", False))


def thaw(cfg: Config) -> Config:
    """A writable deep copy of `cfg` (frozen or not); `cfg` itself is left as it is."""
    copy = _copy.deepcopy(cfg)
    for section in _sections(copy):
        object.__setattr__(section, "_frozen", False)
    return copy


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a resolved config (from config.yaml or a checkpoint)."""
    cfg = Config()
    apply_dict(cfg, data)
    return validate(cfg)
