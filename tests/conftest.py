import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# A tiny version of the digits recipe: trains in seconds on a CPU.
TINY = [
    "model.model_channels=16", "model.channel_mult=[1,2]", "model.attention_resolutions=[2]",
    "train.batch_size=32", "train.log_every=5", "train.progress=false", "train.tensorboard=false",
    "train.warmup_steps=2", "sample.steps=4",
]


def run_cli(*args: str, check: bool = True, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m difftrain ARGS` in a fresh process."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    proc = subprocess.run([sys.executable, "-m", "difftrain", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"difftrain {' '.join(args)} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: tiny models are fastest so, and on a CPU shared with other jobs two
    OpenMP threads can be 50-100x slower. Results do not depend on it. Opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A tiny digits run trained through the CLI in a subprocess, shared by the tests that read it."""
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    run_cli("train", "digits", f"run_dir={run_dir}", "train.steps=20", "train.checkpoint_every=10",
            "train.sample_every=10", *TINY, "train.tensorboard=true")
    return run_dir
