"""The best checkpoint of train.eval_every: checkpoints/best.pt and its record checkpoints/best.json.

best.pt is the checkpoint itself, with its record embedded as its "best" entry; it is written first and is
the truth. best.json is derived from it, so the scores can be compared without loading the checkpoint:

    {"step": 6, "key": "eval_frechet_distance", "value": 1.23,
     "settings": {"n": 1000, "sampler": "ddim", "steps": 50, "seed": 0, "guidance": 3.0, ...},
     "checkpoint": {"bytes": 123456, "tail_sha256": "..."}}

- `record_problem`: what is wrong with a record (not a dict, a step that is not a whole number >= 0, a key
  that is not a ranking metric, a value that is not a finite number, settings that are not a dict).
- `BestCheckpoint.reconcile`: once per run, when training starts (rank 0, under the run's lock): a best.json that is malformed,
  or that does not describe the best.pt beside it (a run killed between the two writes, a file deleted or
  replaced) is moved aside and rebuilt from best.pt's own record; a best.pt that cannot be read or holds no
  valid record is moved aside with its best.json. Nothing is deleted: what goes, goes to
  checkpoints/best-aside-TIME/, with a warning that names it and why.
- `BestCheckpoint.current`: the record scores are compared with. A score is compared only with one made
  under the same evaluation settings (metric key, sample count, sampler, steps, guidance, seed, ...): when
  they changed, the old pair is moved aside with a message and the next score starts a new best.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import warnings
from pathlib import Path

from difftrain.checkpoint import CheckpointError, atomic_write, load_checkpoint, save_checkpoint
from difftrain.training.rundir import BEST_CHECKPOINT, BEST_KEYS, BEST_RECORD, record_problem, set_aside  # noqa: F401 (re-exported)

ASIDE = "best-aside"


TAIL = 1 << 20


def fingerprint(path: Path) -> dict:
    """{"bytes", "tail_sha256"} of a checkpoint: what best.json records of the best.pt it describes.

    torch.save writes a zip file whose central directory, at its end, lists every entry with its CRC-32, so
    the size and the SHA-256 of the last MiB identify the content without reading a checkpoint of gigabytes
    (hashing all of it ran at about 200 MB/s here)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            f.seek(max(0, size - TAIL))
            tail = f.read()
        return {"bytes": size, "tail_sha256": hashlib.sha256(tail).hexdigest()}
    except OSError as e:
        raise CheckpointError(f"cannot read the best checkpoint '{path}': {e.strerror or e}") from None


def aside_folder(ckpt_dir: Path) -> Path:
    """checkpoints/best-aside-YYYYmmdd-HHMMSS (with -N when that exists already)."""
    stem = Path(ckpt_dir) / f"{ASIDE}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder, n = stem, 1
    while folder.exists():
        n += 1
        folder = stem.with_name(f"{stem.name}-{n}")
    return folder


class BestCheckpoint:
    """checkpoints/best.pt and best.json of one run (rank 0 reads and writes them)."""

    def __init__(self, ckpt_dir: Path):
        self.dir = Path(ckpt_dir)
        self.pt, self.json = self.dir / BEST_CHECKPOINT, self.dir / BEST_RECORD
        self.reconciled = False

    def move_aside(self, why: str, paths: list[Path] | None = None) -> None:
        paths = [p for p in (paths or [self.pt, self.json]) if p.exists()]
        if not paths:
            return
        moved = set_aside(paths, aside_folder(self.dir))
        warnings.warn(f"{why}; moved {', '.join(p.name for p in paths)} aside to '{moved[0].parent}'")

    def read_json(self) -> tuple[dict | None, str | None]:
        """(best.json's record, None) or (None, why it is unusable); (None, None) when there is none."""
        try:
            text = self.json.read_text()
        except FileNotFoundError:
            return None, None
        except (OSError, UnicodeDecodeError) as e:
            return None, f"it cannot be read ({getattr(e, 'strerror', None) or e})"
        try:
            record = json.loads(text)
        except ValueError as e:
            return None, f"it is not JSON ({e})"
        problem = record_problem(record)
        return (None, problem) if problem else (record, None)

    def reconcile(self) -> dict | None:
        """Make best.json describe best.pt (see the module docstring); returns the record, None when no best."""
        self.reconciled = True
        record, problem = self.read_json()
        if not self.pt.exists():
            if self.json.exists():
                self.move_aside(f"'{self.json}' has no '{self.pt}' beside it (deleted?); training starts a new best",
                                [self.json])
            return None
        if record is not None and record.get("checkpoint") == fingerprint(self.pt):
            return record
        why = (f"'{self.json}' is unusable: {problem}" if problem else
               f"'{self.json}' is missing" if not self.json.exists() else
               f"'{self.json}' does not describe the '{self.pt}' beside it (a run stopped between the two writes, "
               f"or a file replaced)")
        try:
            embedded = load_checkpoint(self.pt).get("best")
        except CheckpointError as e:
            self.move_aside(f"{why}, and {e}; training starts a new best")
            return None
        problem = record_problem(embedded)
        if problem:
            self.move_aside(f"{why}, and the record inside '{self.pt}' is unusable: {problem}; training starts a new best")
            return None
        if self.json.exists():
            self.move_aside(why, [self.json])
        record = {k: v for k, v in embedded.items() if k != "checkpoint"}
        self.write_json(record)
        print(f"difftrain: {why}; rebuilt it from the record inside best.pt (step {record['step']}, "
              f"{record['key']} {record['value']:g})", file=sys.stderr)
        return self.read_json()[0]

    def current(self, key: str, settings: dict) -> dict | None:
        """The record a score of `key` under `settings` is compared with (None: no comparable best yet; an
        incomparable one is moved aside)."""
        record = self.reconcile() if not self.reconciled else self.read_json()[0]
        if record is None:
            return None
        old = {"key": record["key"], **record.get("settings", {})}
        new = {"key": key, **settings}
        if old != new:
            changed = sorted(k for k in old.keys() | new.keys() if old.get(k, "(unset)") != new.get(k, "(unset)"))
            described = "; ".join(f"{k}: {old.get(k, '(unset)')} -> {new.get(k, '(unset)')}" for k in changed)
            self.move_aside(f"the best checkpoint (step {record['step']}) was scored under other evaluation settings "
                            f"({described}); its score is not comparable, so a new best starts")
            return None
        return record

    def keep(self, state: dict, record: dict) -> None:
        """best.pt (the checkpoint with `record` as its "best" entry, atomic), then best.json derived from it."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CheckpointError(f"cannot create '{self.dir}': {e.strerror or e}") from None
        save_checkpoint({**state, "best": record}, self.pt)
        self.write_json(record)
        self.reconciled = True

    def write_json(self, record: dict) -> None:
        text = json.dumps({**record, "checkpoint": fingerprint(self.pt)}) + "\n"
        atomic_write(self.json, lambda f: f.write(text.encode()), what="best-checkpoint record")
