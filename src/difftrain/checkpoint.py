"""Checkpoint files: atomic writes, safe loads, and clear errors.

A checkpoint is a plain dict of tensors and Python scalars, written with `torch.save` to a
temporary file that is fsync'ed and renamed over the target, so a crash leaves either the
old file or the new one. It is read back with `torch.load(weights_only=True)`: loading
never runs code from the file.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT = "difftrain-checkpoint"
VERSION = 1
STEP_FILE = re.compile(r"^step-(\d{7,})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message names the file."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}.pt"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


TEMP_FILE = re.compile(r"^\.(.+)\.tmp-(\d+)$")  # .NAME.tmp-PID: every temporary file or folder of a write


def temp_path(path: Path) -> Path:
    """Where a write of `path` goes first: `.NAME.tmp-PID` beside it (the one naming scheme of temporary files
    and folders, so a writer killed mid-write leaves something `remove_stale_temp_files` recognises)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError, OSError):
        return True  # someone else's process (or a pid we cannot ask about): leave its file alone
    return True


def remove_stale_temp_files(folder: Path, name: str | None = None, quiet: bool = False) -> list[Path]:
    """Delete the temporary files and folders (`.NAME.tmp-PID`) in `folder` whose writer is no longer running:
    left by a process killed mid-write. `name`: only those of that target. A writer that is alive (this process,
    or another one such as a `difftrain report` running beside the trainer) keeps its file. Prints one note
    naming what went, unless `quiet`; returns the removed paths."""
    import glob
    import shutil

    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = []
    for p in sorted(folder.glob(f".{glob.escape(name)}.tmp-*" if name else ".*.tmp-*")):
        found = TEMP_FILE.match(p.name)
        if found is None or (name is not None and found[1] != name) or _pid_alive(int(found[2])):
            continue
        try:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        except FileNotFoundError:
            continue
        except OSError as e:
            warnings.warn(f"cannot remove the temporary file '{p}' left by an interrupted write: {e.strerror or e}")
            continue
        stale.append(p)
    if stale and not quiet:
        print(f"difftrain: removed {len(stale)} temporary file(s) left by interrupted writes (writer no longer "
              f"running) in '{folder}': {', '.join(p.name for p in stale)}", file=sys.stderr)
    return stale


_SWEPT: set[str] = set()  # folders this process has removed stale temporary files from


def refuse_symlink(path: Path, what: str = "file") -> None:
    """Raise CheckpointError when `path` is a symbolic link: a run directory's files are written in place, and
    following a link planted there would overwrite whatever file it points to, inside the run or not."""
    path = Path(path)
    if path.is_symlink():
        raise CheckpointError(f"refusing to write {what} '{path}': it is a symbolic link (to '{os.readlink(path)}'), "
                              f"and writing through it would change that file; remove the link or train into "
                              f"another run_dir")


def open_nofollow(path: Path, flags: int, what: str = "file", mode: int = 0o644) -> int:
    """os.open(path, flags) that never follows a symbolic link at `path` (O_NOFOLLOW): a link is refused with a
    CheckpointError naming it, as is any other OS error."""
    path = Path(path)
    refuse_symlink(path, what)
    try:
        return os.open(path, flags | os.O_NOFOLLOW, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:  # planted between the check and the open
            refuse_symlink(path, what)
        raise CheckpointError(f"cannot open {what} '{path}': {e.strerror or e}") from None


def atomic_write(path: Path, write, what: str = "file") -> None:
    """Call `write(file)` on a temporary file beside `path` (`temp_path`), fsync it, then rename it over `path`.

    The temporary file is created with O_EXCL | O_NOFOLLOW and `path` must not be a symbolic link, so no link
    planted in the run directory is ever followed (refuse_symlink). The first write of this process into a folder
    first removes the temporary files that killed writers left there (`remove_stale_temp_files`; once per folder,
    so writing many files stays linear). Any failure (a full disk: OSError, or torch's RuntimeError around it)
    removes the temporary file and raises CheckpointError naming `what`, the file and the cause; the file at
    `path` stays as it was."""
    path = Path(path)
    refuse_symlink(path, what)
    folder = os.path.abspath(path.parent)
    if folder not in _SWEPT:
        _SWEPT.add(folder)
        remove_stale_temp_files(path.parent)
    tmp = temp_path(path)
    if os.path.lexists(tmp):  # a leftover (or a link) in our temporary file's place: unlink removes the entry,
        tmp.unlink()          # never a link's target
    created = False
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        created = True
        with open(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        refuse_symlink(path, what)  # planted while we wrote
        os.replace(tmp, path)
    except BaseException as e:
        if created:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
        if isinstance(e, CheckpointError) or not isinstance(e, (OSError, RuntimeError)):
            raise
        raise write_error(what, path, e) from None
    _fsync_dir(path.parent)


def write_error(what: str, path: Path, e: BaseException) -> CheckpointError:
    """The error of a failed write: `cannot write WHAT 'PATH': No space left on device; files written before are
    intact` (the OS error behind `e`)."""
    return CheckpointError(f"cannot write {what} '{path}': {_cause(e)}; files written before are intact")


def atomic_write_text(path: Path, text: str, what: str = "file") -> None:
    """`text` to `path` through `atomic_write`, creating its folder (a failure there is the same clear error)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(what, path, e) from None
    atomic_write(path, lambda f: f.write(text.encode()), what=what)


def _cause(e: BaseException) -> str:
    """The OS error behind `e` (torch.save wraps a failed file write in a RuntimeError), or e's first line."""
    seen = e
    while seen is not None and not isinstance(seen, OSError):
        seen = seen.__cause__ or seen.__context__
    if isinstance(seen, OSError):
        return seen.strerror or str(seen)
    text = (str(e) or type(e).__name__).splitlines()[0]
    found = re.search(r"\(os error (\d+)\)", text)  # safetensors' (Rust) I/O errors end so
    return os.strerror(int(found[1])) if found else text


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    state = {"format": FORMAT, "version": VERSION, **state}
    atomic_write(path, lambda f: torch.save(state, f), what="checkpoint")


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`; never executes code stored in the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    other = _other_format(path)
    if other:
        raise CheckpointError(f"'{path}' is not a difftrain checkpoint but {other}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))  # torch words it in several ways
        if found:  # torch's message suggests loading it unsafely: the one thing not to do
            raise CheckpointError(f"'{path}' is refused: it contains pickled code or objects ({found[1]}) that a "
                                  f"difftrain checkpoint never holds; it was not loaded and nothing from it was run") from None
        reason = str(e).split("WeightsUnpickler error:")[-1].strip() or "damaged pickle data"
        raise CheckpointError(f"checkpoint '{path}' is truncated or corrupt: {reason.splitlines()[0]}") from None
    except Exception as e:  # whatever a damaged file makes the zip reader or the unpickler raise
        raise CheckpointError(f"checkpoint '{path}' is truncated or corrupt: "
                              f"{(str(e) or type(e).__name__).splitlines()[0]}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is not a difftrain checkpoint")
    return state


def _other_format(path: Path) -> str | None:
    """What a file given as a checkpoint is instead: a NumPy .npz (e.g. samples) or a safetensors export."""
    with open(path, "rb") as f:
        head = f.read(9)
    if path.suffix == ".npz" or head[:4] == b"PK\x03\x04":  # torch.save writes zip files too: look inside
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError):
            names = []
        if path.suffix == ".npz" or (names and all(n.endswith(".npy") for n in names)):
            return (f"a NumPy .npz file ({', '.join(n.removesuffix('.npy') for n in names[:4]) or 'unreadable'}); "
                    f"to score the samples in it: `difftrain eval --samples {path}`")
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size:
        return ("a safetensors weights export (weights without the config); give the run directory or one of "
                "its checkpoints/step-NNNNNNN.pt")
    return None


def images_seen(state: dict) -> int:
    """The images a checkpoint's run trained on: its "images_seen", or for checkpoints written before it was stored,
    step x the stored config's batch size x world size (right unless the batch changed on a resume)."""
    if "images_seen" in state:
        return int(state["images_seen"])
    batch = int(state.get("config", {}).get("train", {}).get("batch_size", 0))
    return int(state["step"]) * batch * int(state.get("world_size", 1))


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoints in `folder`, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if STEP_FILE.match(p.name)), key=checkpoint_step)


def newest_valid_checkpoint(folder: Path, skipped: list[Path] | None = None) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads, warning about each newer one that does not (appended to `skipped`)."""
    for path in reversed(list_checkpoints(folder)):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as e:
            warnings.warn(f"skipping unreadable checkpoint: {e}")
            if skipped is not None:
                skipped.append(path)
    return None


def read_run_checkpoint(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """(file, state) of a run directory's newest readable checkpoint, or of the checkpoint file `path`."""
    path = Path(path)
    if not path.is_dir():
        return path, load_checkpoint(path)
    found = newest_valid_checkpoint(path / "checkpoints")
    if found is None:
        raise CheckpointError(f"no readable checkpoint in '{path / 'checkpoints'}' (is '{path}' a run directory?)")
    return found


def looks_complete(path: Path) -> bool:
    """Whether `path` is a whole torch.save zip (its central directory, at the end, names data.pkl): a cheap
    check that catches truncated and foreign files without loading the tensors."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(name.endswith("data.pkl") for name in z.namelist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return False


def checkpoint_step(path: Path) -> int:
    return int(STEP_FILE.match(Path(path).name)[1])


def prune_checkpoints(folder: Path, keep: int, milestone_every: int = 0, newest: Path | None = None) -> list[Path]:
    """Delete old checkpoints, keeping the newest `keep` complete ones and milestones (keep <= 0 keeps everything).

    Only checkpoints up to `newest` (the one just written: the current trajectory) are considered, and
    a file that does not look complete is neither counted as kept nor deleted, so pruning never deletes
    the newest good checkpoint. A milestone is a checkpoint whose step is a multiple of `milestone_every`
    (> 0). Returns the deleted files.
    """
    if keep <= 0:
        return []
    paths = list_checkpoints(folder)
    if newest is not None:
        paths = [p for p in paths if checkpoint_step(p) <= checkpoint_step(newest)]
    kept, removed = 0, []
    for path in reversed(paths):
        if path != newest and not looks_complete(path):
            continue
        if kept < keep:
            kept += 1
        elif not (milestone_every > 0 and checkpoint_step(path) % milestone_every == 0):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """`model.load_state_dict(state)` with an error that lists every mismatched key and shape."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        lines = [f"'{source}' holds weights of another architecture than the configured model:"]
        for title, items in (("missing from checkpoint", missing), ("not in model", unexpected), ("shape mismatch", shapes)):
            if items:
                shown = items[:10] + ([f"... and {len(items) - 10} more"] if len(items) > 10 else [])
                lines.append(f"  {title} ({len(items)}): " + "; ".join(shown))
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state)


def export_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    data = save(tensors, metadata=metadata)
    atomic_write(path, lambda f: f.write(data), what="weights")


def weights_file(run_dir: Path, weights: str) -> Path | None:
    """The safetensors file that `weights` names, or None (weights inside the checkpoint): "phema-SIGMA" is
    RUN/weights-phema-SIGMA.safetensors (a post-hoc EMA from `difftrain ema`), a path ending .safetensors that file."""
    if weights.endswith(".safetensors"):
        return Path(weights)
    if not weights.startswith("phema-"):
        return None
    try:
        sigma = float(weights.removeprefix("phema-"))
    except ValueError:
        raise CheckpointError(f"unknown weights '{weights}': name a post-hoc EMA as phema-SIGMA, e.g. phema-0.1") from None
    return Path(run_dir) / f"weights-phema-{sigma!r}.safetensors"


def load_weights_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a safetensors weights file; a clear error when it is missing or unreadable."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        hint = (f"; reconstruct it with `difftrain ema {path.parent} --sigma-rel "
                f"{path.name.removeprefix('weights-phema-').removesuffix('.safetensors')}`"
                if path.name.startswith("weights-phema-") else "")
        raise CheckpointError(f"weights file '{path}' does not exist{hint}")
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"'{path}' is not a readable safetensors file: {e}") from None


def select_weights(state: dict[str, Any], weights: str, source: str) -> dict[str, torch.Tensor]:
    """The state dict named by `weights`: "ema" (the default EMA), "raw", or an EMA rate such as "0.9999"."""
    if weights == "raw":
        return state["model"]
    if weights == "ema":
        return state["ema"]["weights"]
    emas = state.get("emas") or [state["ema"]]
    rates = [float(e["rate"]) for e in emas]
    try:
        rate = float(weights)
    except ValueError:
        rate = None
    for e in emas:
        if rate is not None and float(e["rate"]) == rate:
            return e["weights"]
    raise CheckpointError(f"unknown weights '{weights}' for '{source}'; choose from ema, raw, "
                          + ", ".join(repr(r) for r in rates))
