"""Keeping a run directory consistent: one writer, a resume that never deletes, one metrics line per step.

- `RunLock`: `RUN_DIR/.lock`, held with fcntl.flock by the one process that writes the run (rank 0
  under torchrun). The OS releases it when the process ends, however it ends (kill -9 included); the
  file names the holder (pid, host, start time) for the error a second trainer gets.
- `set_aside`: checkpoints a resume must not use again are moved, never deleted: unreadable files to
  `checkpoints/unreadable/`, those after the resumed step to `checkpoints/abandoned-TIMESTAMP/`.
- `config_changes`: the keys whose change makes a checkpoint mean something else (objective, model,
  image shape); resuming with any of them changed is refused unless train.allow_config_change.
- `trim_metrics`: metrics.jsonl without the lines after the resumed step (and any cut-short line).
- `read_best`: `checkpoints/best.json`, the step and score of `checkpoints/best.pt` (train.eval_every keeps the
  best-scoring checkpoint there; pruning never touches it: it is not a step-NNNNNNN.pt).
- `write_report_page`: RUN_DIR/report.html at the end of a run (a failure only warns).
"""

from __future__ import annotations

import errno
import filecmp
import json
import math
import os
import re
import shutil
import socket
import sys
import time
import warnings
from pathlib import Path

from difftrain.checkpoint import (
    CheckpointError,
    atomic_write,
    checkpoint_step,
    list_checkpoints,
    load_checkpoint,
    looks_complete,
    newest_valid_checkpoint,
    open_nofollow,
)
from difftrain.config import Config, ConfigError
from difftrain.training import metrics

LOCK_FILE = ".lock"
UNREADABLE = "unreadable"
BEST_CHECKPOINT, BEST_RECORD = "best.pt", "best.json"
BEST_KEYS = ("eval_frechet_distance", "eval_fid")  # the first one present ranks the checkpoints; lower is better
GRID_FILE = re.compile(r"step-(\d{7,})(-raw)?\.png")  # samples/: a grid of a step, EMA or raw weights

# Keys that change what a checkpoint's weights mean; every other key (steps, lr, intervals, device,
# logging, sampling, ...) may change on resume. Model keys: all but model.init_from.
OBJECTIVE_KEYS = ("diffusion.process", "diffusion.prediction", "diffusion.schedule", "diffusion.timesteps",
                  "diffusion.beta_start", "diffusion.beta_end", "diffusion.learn_sigma", "diffusion.shift",
                  "diffusion.zero_terminal_snr", "diffusion.sigma_data",
                  "train.task", "data.image_size", "data.channels")
AUTOENCODER_KEYS = ("kind", "ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels", "embed_dim",
                    "resolution", "n_embed", "codebook")


class RunDirBusy(ConfigError):
    """Another process is writing this run directory."""


class RunLock:
    """An exclusive lock on `RUN_DIR/.lock` for the life of this object's `acquire` ... `release`."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        fd = open_nofollow(self.path, os.O_RDWR | os.O_CREAT, "the lock file")  # a planted link is refused
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 4096).decode(errors="replace")
            os.close(fd)
            raise RunDirBusy(f"run directory '{self.path.parent}' is in use by another trainer ({describe_holder(holder)}); "
                             f"wait for it to end, stop it, or train into another run_dir") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(info) + "\n").encode())
        self.fd = fd

    def release(self) -> None:
        """Unlock (closing the file releases the flock); the file stays, naming the last holder."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def describe_holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


def set_aside(paths: list[Path], folder: Path) -> list[Path]:
    """Move `paths` into `folder` (created), all or none (move_all); returns the new paths."""
    return move_all([(p, folder / p.name) for p in paths])


def move_all(moves: list[tuple[Path, Path]]) -> list[Path]:
    """Move each (source, target) pair, all or none; returns the targets.

    Every target is checked free first. A move renames when source and target folder are on one file system;
    otherwise (a checkpoints/ link to another disk: os.replace raises EXDEV) it copies, fsyncs and compares the
    copy, and deletes the sources only once every move is done. Any failure undoes the moves done so far (renames
    back, copies deleted) and raises CheckpointError naming the file: the run directory is as it was."""
    for source, target in moves:
        if os.path.lexists(target):
            raise CheckpointError(f"cannot move '{source}' aside: '{target}' exists already; nothing was moved")
    renamed: list[tuple[Path, Path]] = []
    copied: list[tuple[Path, Path]] = []
    made: list[Path] = []
    try:
        for source, target in moves:
            if not target.parent.is_dir():
                target.parent.mkdir(parents=True)
                made.append(target.parent)
            try:
                os.replace(source, target)
                renamed.append((source, target))
            except OSError as e:
                if e.errno != errno.EXDEV:
                    raise
                copied.append((source, target))  # before copying: a copy cut short is removed too
                _copy_verified(source, target)
    except OSError as e:
        for source, target in reversed(renamed):
            os.replace(target, source)
        for _, target in copied:
            _remove(target)
        for folder in reversed(made):
            _remove(folder)
        raise CheckpointError(f"cannot move '{source}' aside to '{target}': {e.strerror or e}; nothing was moved") from None
    for source, _ in copied:
        _remove(source)
    return [target for _, target in moves]


def _copy_verified(source: Path, target: Path) -> None:
    """Copy a file or folder across file systems, fsynced, then compare it with the source (OSError if it differs)."""
    if source.is_dir() and not source.is_symlink():
        shutil.copytree(source, target, symlinks=True)
        for path in source.rglob("*"):
            if path.is_file() and not path.is_symlink() and not filecmp.cmp(path, target / path.relative_to(source), False):
                raise OSError(errno.EIO, f"the copy of '{path}' differs from it")
        return
    shutil.copy2(source, target, follow_symlinks=False)
    if not source.is_symlink():
        with open(target, "rb") as f:
            os.fsync(f.fileno())
        if not filecmp.cmp(source, target, shallow=False):
            raise OSError(errno.EIO, f"the copy '{target}' differs from '{source}'")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def abandoned_folder(parent: Path) -> Path:
    """PARENT/abandoned-YYYYmmdd-HHMMSS (with -N when that exists already): checkpoints/ or the run directory."""
    stem = parent / f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}"
    folder, n = stem, 1
    while folder.exists():
        n += 1
        folder = stem.with_name(f"{stem.name}-{n}")
    return folder


def later_weights(run_dir: Path, step: int) -> list[Path]:
    """The run's weights*.safetensors exported after `step` (their metadata names the step)."""
    from safetensors import safe_open

    found = []
    for path in sorted(run_dir.glob("weights*.safetensors")):
        try:
            with safe_open(str(path), "pt") as f:
                saved = int((f.metadata() or {}).get("step", -1))
        except (OSError, ValueError, RuntimeError):
            continue
        if saved > step:
            found.append(path)
    return found


def _get(tree: dict, key: str):
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return KeyError
        tree = tree[part]
    return tree


def config_changes(saved: dict, cfg: Config) -> list[str]:
    """`key: old -> new` for each objective, model or image-shape key that differs from the checkpoint's config
    (keys the checkpoint does not record are not compared)."""
    new = cfg.to_dict()
    keys = [*OBJECTIVE_KEYS, *(f"model.{k}" for k in new["model"] if k != "init_from")]
    if cfg.autoencoder.kind != "none":
        keys += [f"autoencoder.{k}" for k in AUTOENCODER_KEYS]
    changes = []
    for key in keys:
        old = _get(saved, key)
        if old is not KeyError and old != _get(new, key):
            changes.append(f"{key}: {old} -> {_get(new, key)}")
    return changes


def trim_metrics(run_dir: Path, step: int) -> int:
    """Drop the metrics.jsonl lines of steps after `step`, any line cut short and any damaged one (not UTF-8, not
    a metrics line: training/metrics.lines_up_to); returns how many went."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return 0
    kept, gone = metrics.lines_up_to(path, step)
    if gone:
        atomic_write(path, lambda f: f.write(kept), what="metrics")
    return gone


def find_checkpoint(ckpt_dir: Path, mode: str) -> tuple[tuple[Path, dict] | None, list[Path]]:
    """((path, state) that train.resume=`mode` resumes from, or None; the unreadable checkpoint files)."""
    if mode in ("none", "restart"):
        return None, []
    skipped: list[Path] = []
    found = newest_valid_checkpoint(ckpt_dir, skipped) if mode == "auto" else (Path(mode), load_checkpoint(Path(mode)))
    resumed = found[0] if found else None
    unreadable = skipped + [p for p in list_checkpoints(ckpt_dir)
                            if p not in skipped and p != resumed and not looks_complete(p)]
    return found, unreadable


def will_resume(cfg: Config) -> bool:
    """Whether train.resume will load a checkpoint of cfg.run_dir (a path, or auto with a complete one there): the
    checkpoint's weights then replace model.init_from's, which need not be read (nor exist any more)."""
    mode = cfg.train.resume
    if mode in ("none", "restart"):
        return False
    return mode != "auto" or any(looks_complete(p) for p in list_checkpoints(Path(cfg.run_dir) / "checkpoints"))


def check_config_change(path: Path, state: dict, cfg: Config) -> None:
    """Refuse to resume `state` with a changed objective, model or image shape (unless train.allow_config_change)."""
    changes = config_changes(state["config"], cfg)
    if changes and not cfg.train.allow_config_change:
        raise ConfigError(f"'{path}' was trained with another objective or model; this config changes "
                          + "; ".join(changes) + ". Set train.allow_config_change=true to resume it anyway "
                          "(e.g. to fine-tune), or train into another run_dir")
    if changes:
        warnings.warn(f"resuming '{path}' with {'; '.join(changes)} (train.allow_config_change=true)")


def tidy_for_resume(run_dir: Path, step: int, unreadable: list[Path]) -> None:
    """Move the unreadable checkpoints and those after `step` (with the weights exported after it) aside;
    trim metrics.jsonl to `step`. Rank 0 only."""
    ckpt_dir = run_dir / "checkpoints"
    if unreadable:
        set_aside(unreadable, ckpt_dir / UNREADABLE)
        warnings.warn(f"moved the unreadable checkpoint(s) {', '.join(p.name for p in unreadable)} to "
                      f"'{ckpt_dir / UNREADABLE}'")
    later = [p for p in list_checkpoints(ckpt_dir) if checkpoint_step(p) > step]
    if later:
        folder = abandoned_folder(ckpt_dir)
        weights = later_weights(run_dir, step)
        move_all([(p, folder / p.name) for p in later + weights + later_best(ckpt_dir, step)]
                 + [(p, folder / "samples" / p.name) for p in later_grids(run_dir, step, final=bool(weights))])
        print(f"difftrain: resuming at step {step}: moved the {len(later)} later checkpoint(s) "
              f"({later[0].name} .. {later[-1].name}), their weights and grids aside to '{folder}'; the run, "
              f"`difftrain sample`, the report and the next resume no longer use them", file=sys.stderr)
    trim_metrics(run_dir, step)


def later_grids(run_dir: Path, step: int, final: bool) -> list[Path]:
    """samples/step-NNNNNNN[-raw].png of steps after `step`, and the final grids when `final` (the final weights
    were exported after `step`: the grids are of the same trajectory)."""
    folder = Path(run_dir) / "samples"
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.iterdir()):
        grid = GRID_FILE.fullmatch(path.name)
        if (grid and int(grid[1]) > step) or (final and path.name in ("final.png", "final-raw.png")):
            found.append(path)
    return found


def trained_run_files(run_dir: Path) -> list[Path]:
    """The files that show `run_dir` holds a trained run: metrics lines, checkpoints (readable or not), the best
    checkpoint, exported weights, post-hoc EMA snapshots. Empty for a new run directory."""
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    found = [p for p in [run_dir / "metrics.jsonl"] if p.is_file() and p.stat().st_size > 0]
    found += list_checkpoints(ckpt_dir)
    found += [p for p in (ckpt_dir / BEST_CHECKPOINT, ckpt_dir / BEST_RECORD) if os.path.lexists(p)]
    found += sorted(run_dir.glob("weights*.safetensors"))
    found += sorted((run_dir / "ema-snapshots").glob("step-*.safetensors"))
    return found


def refuse_start_over(run_dir: Path, mode: str, unreadable: list[Path]) -> None:
    """Refuse to train `run_dir` from step 0 when it holds a trained run (train.resume=none, or no checkpoint
    loads): its metrics, weights, grids, best checkpoint and snapshots would mix with a new model's."""
    used = trained_run_files(run_dir)
    if not used:
        return
    shown = ", ".join(str(p.relative_to(run_dir)) for p in used[:4]) + (f" and {len(used) - 4} more" if len(used) > 4 else "")
    why = ("train.resume=none would start it over" if mode == "none" else
           f"no checkpoint in it loads ({len(unreadable)} unreadable)" if unreadable else "it has no checkpoint to resume")
    raise ConfigError(f"run directory '{run_dir}' holds a trained run ({shown}) and {why}. Set train.resume=restart "
                      f"to move the old run aside to '{run_dir}/abandoned-TIME/' and train from step 0, or train "
                      f"into another run_dir")


def move_run_aside(run_dir: Path) -> Path | None:
    """train.resume=restart: move everything in `run_dir` but the lock and earlier abandoned-* folders to
    run_dir/abandoned-TIMESTAMP/ (all or nothing); returns that folder, or None when there was nothing."""
    run_dir = Path(run_dir)
    entries = [p for p in sorted(run_dir.iterdir()) if p.name != LOCK_FILE and not p.name.startswith("abandoned-")]
    if not entries:
        return None
    folder = abandoned_folder(run_dir)
    move_all([(p, folder / p.name) for p in entries])
    print(f"difftrain: train.resume=restart: moved the previous run ({', '.join(p.name for p in entries)}) aside to "
          f"'{folder}'; training starts at step 0", file=sys.stderr)
    return folder


def record_problem(record) -> str | None:
    """Why `record` is not a usable best record (None: it is one)."""
    if not isinstance(record, dict):
        return f"it holds {type(record).__name__ if record is not None else 'null'}, not a record"
    missing = [k for k in ("step", "key", "value") if k not in record]
    if missing:
        return f"it lacks {', '.join(missing)}"
    step, key, value = record["step"], record["key"], record["value"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return f"its step {step!r} is not a whole number >= 0"
    if key not in BEST_KEYS:
        return f"its key {key!r} is not one of {', '.join(BEST_KEYS)}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"its value {value!r} is not a finite number"
    if not isinstance(record.get("settings", {}), dict):
        return f"its settings {record['settings']!r} are not a mapping"
    return None


def read_best(ckpt_dir: Path) -> dict | None:
    """checkpoints/best.json: {"step", "key", "value"} of checkpoints/best.pt; None when absent or unreadable."""
    try:
        record = json.loads((Path(ckpt_dir) / BEST_RECORD).read_text())
        return record if record_problem(record) is None else None
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def later_best(ckpt_dir: Path, step: int) -> list[Path]:
    """best.pt and best.json when the best checkpoint is of a step after `step` (another trajectory)."""
    best = read_best(ckpt_dir)
    if best is None or int(best["step"]) <= step:
        return []
    return [p for p in (Path(ckpt_dir) / BEST_CHECKPOINT, Path(ckpt_dir) / BEST_RECORD) if p.exists()]


def write_report_page(run_dir: Path) -> str:
    """Write RUN_DIR/report.html; returns its path, or why it was not written (after a warning): a report
    that cannot be made never fails the run it reports on."""
    from difftrain.report import write_report

    try:
        return str(write_report(run_dir))
    except Exception as e:  # noqa: BLE001 (any failure: the run itself is complete)
        reason = f"{type(e).__name__}: {e}".splitlines()[0]
        warnings.warn(f"could not write the report page of '{run_dir}': {reason}; retry with `difftrain report {run_dir}`")
        return f"not written ({reason})"
