"""runtime: device names and the cache folder."""

from pathlib import Path

import pytest
import torch

from difftrain.config import ConfigError
from difftrain.runtime import cache_dir, resolve_device


def test_cache_dir_prefers_difftrain_cache_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFTRAIN_CACHE", str(tmp_path / "dt"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "dt"
    monkeypatch.delenv("DIFFTRAIN_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "difftrain"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == Path(tmp_path / "home" / ".cache" / "difftrain")


def test_resolve_device_names(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device("cuda:0")
    with pytest.raises(ConfigError, match="unknown device 'gpu'"):
        resolve_device("gpu")


def test_keep_freed_memory_sets_glibc_thresholds():
    """On glibc (this project's machines) the allocator keeps freed activations; elsewhere nothing changes."""
    import platform

    from difftrain.runtime import keep_freed_memory

    expected = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() is expected
