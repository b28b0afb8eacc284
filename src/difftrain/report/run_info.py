"""RUN/run_info.json: the machine a run trained on, written by rank 0 when a training session starts.

    {"format": "difftrain-run-info", "version": 1, "started": "2026-01-31T12:00:00+00:00",
     "device": "cuda:0", "device_name": "NVIDIA H200", "device_count": 1, "cuda": "12.4",
     "cpu": "AMD EPYC 7B13", "cpu_count": 16, "threads": 8, "world_size": 1,
     "torch": "2.5.1", "python": "3.11.2", "difftrain": "0.1.0", "platform": "Linux-6.1-x86_64"}

A resumed run overwrites it with the newest session's machine.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path
from typing import Any

from difftrain.report.rundata import RUN_INFO

FORMAT, VERSION = "difftrain-run-info", 1


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def collect_run_info(device: Any = "cpu", world_size: int = 1) -> dict[str, Any]:
    """The run_info.json fields for a process that trains on `device` (a torch.device or its name)."""
    import torch

    import difftrain

    device = torch.device(device)
    cuda = device.type == "cuda" and torch.cuda.is_available()
    return {
        "format": FORMAT, "version": VERSION,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else cpu_name(),
        "device_count": torch.cuda.device_count() if cuda else 1,
        "cuda": torch.version.cuda if cuda else None,
        "cpu": cpu_name(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
        "world_size": int(world_size),
        "torch": torch.__version__, "python": platform.python_version(), "difftrain": difftrain.__version__,
        "platform": platform.platform(terse=True),
    }


def write_run_info(run_dir: str | Path, device: Any = "cpu", world_size: int = 1) -> Path:
    """Write RUN_DIR/run_info.json atomically; returns its path."""
    from difftrain.checkpoint import atomic_write

    path = Path(run_dir) / RUN_INFO
    text = json.dumps(collect_run_info(device, world_size), indent=2) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))
    return path
