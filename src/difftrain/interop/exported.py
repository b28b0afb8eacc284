"""What an export produced: the converted model (`Exported`) and the export's report (`ExportReport`).

Shared by diffusers_export.py (which makes them) and model_card.py (which describes them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from difftrain.interop.convert_dit import CLASSES

SUBFOLDERS = {"unet": "unet", "sd3": "transformer", "flux": "transformer"}


@dataclass
class Exported:
    """Our denoiser converted: the diffusers class, its config and weights, and how it is called (target)."""

    target: str  # unet | sd3 | flux
    config: dict
    state: dict[str, Tensor]
    patch_size: int = 1

    @property
    def class_name(self) -> str:
        return "UNet2DModel" if self.target == "unet" else CLASSES[self.target]

    @property
    def subfolder(self) -> str:
        return SUBFOLDERS[self.target]


@dataclass
class ExportReport:
    out: Path
    model_class: str
    scheduler: str
    pipeline: str | None
    max_abs_diff: float
    step: int
    facts: dict = field(default_factory=dict)

    def summary(self) -> str:
        pipe = f", model_index.json for {self.pipeline}" if self.pipeline else ""
        return (f"wrote {self.model_class} + {self.scheduler}{pipe} and README.md from {self.facts['source']} "
                f"(step {self.step}, {self.facts['weights']} weights) to {self.out}; "
                f"max |diffusers - difftrain| on a test batch: {self.max_abs_diff:.1e}")
