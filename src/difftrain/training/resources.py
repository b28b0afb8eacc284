"""What a run will need before it starts: the memory estimate `difftrain train --dry-run` prints.

Device memory of a diffusion run, per process:

    data         the training split, held where the batches are drawn (BatchStream moves it to the device):
                 N x C x H x W bytes (uint8 images; 4 bytes a value for float latents); shards stream: 0
    model state  P parameters x 4 bytes x (weights + grads + AdamW's two moments + one copy per EMA rate
                 and per train.posthoc_ema width)
    activations  the bytes autograd saves for backward in one forward of the model at a small batch b
                 (counted with saved_tensors_hooks on the CPU in fp32), scaled linearly to the micro-batch

It is an estimate: allocator caching, cuDNN workspaces, fragmentation and the sampling grids come on top,
and bf16 / fp16 autocast saves some activations at half the size (the figure is then high).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from difftrain.config import Config
from difftrain.data import Splits
from difftrain.models import build_model

PROBE_BATCH = 2  # the small batch the activations are measured at
GB = 1024**3


@dataclass
class MemoryEstimate:
    batch: int  # samples in one forward / backward (train.microbatch, else train.batch_size)
    data_bytes: int
    n_images: int
    parameters: int
    state_copies: int  # weights, grads, AdamW moments, EMAs, power EMAs
    activation_bytes_per_sample: float

    @property
    def state_bytes(self) -> int:
        return 4 * self.parameters * self.state_copies

    @property
    def activation_bytes(self) -> float:
        return self.activation_bytes_per_sample * self.batch

    @property
    def total_bytes(self) -> float:
        return self.data_bytes + self.state_bytes + self.activation_bytes

    def describe(self) -> str:
        """YAML comment lines (the dry run's output stays a valid config)."""
        return (f"# memory estimate per device: {self.total_bytes / GB:.3g} GB\n"
                f"#   data {self.data_bytes / GB:.3g} GB ({self.n_images} training images in memory)\n"
                f"#   model state {self.state_bytes / GB:.3g} GB ({self.parameters:,} parameters x "
                f"{self.state_copies} copies: weights, grads, 2 AdamW moments, EMAs)\n"
                f"#   activations {self.activation_bytes / GB:.3g} GB ({self.activation_bytes_per_sample / 2**20:.3g} MB "
                f"a sample, measured at batch {PROBE_BATCH} in fp32, x {self.batch})\n"
                f"# (an estimate: allocator caching, workspaces and sampling grids come on top)")


def saved_activation_bytes(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> int:
    """Bytes of the tensors autograd saves for backward in one forward of `model` (each storage counted once)."""
    seen: dict[tuple[int, int], int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        seen[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        return tensor

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(x, t, y)
    out.float().square().mean().backward()
    return sum(n for (ptr, _), n in seen.items() if ptr not in params)  # weights are counted in the model state


def estimate_memory(cfg: Config, splits: Splits) -> MemoryEstimate | str:
    """The memory estimate of a diffusion run's resolved config (training/resolve.py) on its data, or why there
    is none (a sentence). Builds the model on the CPU; `cfg` is only read."""
    if cfg.autoencoder.kind != "none" or cfg.latent.first_stage:
        return "no memory estimate for autoencoder and latent runs (their encoders are not built by a dry run)"
    t = cfg.train
    n = len(splits.train)
    images = getattr(splits.train, "images", None)  # a ShardSet streams: nothing held
    data_bytes = images.numel() * images.element_size() if images is not None else 0
    model = build_model(cfg.model)
    parameters = sum(p.numel() for p in model.parameters())
    copies = 4 + len(t.ema_rates) + len(t.posthoc_ema)
    m = cfg.model
    x = torch.randn(PROBE_BATCH, m.in_channels, m.image_size, m.image_size)
    steps = torch.full((PROBE_BATCH,), cfg.diffusion.timesteps / 2)
    y = torch.zeros(PROBE_BATCH, dtype=torch.long) if m.num_classes else None
    per_sample = saved_activation_bytes(model, x, steps, y) / PROBE_BATCH
    return MemoryEstimate(t.microbatch or t.batch_size, data_bytes, n, parameters, copies, per_sample)
