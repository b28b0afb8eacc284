"""A train/test split decided by names: the held-out units (fonts, emoji) follow from their names alone.

`held_out(keys, test_fraction, seed)` ranks the distinct keys by a BLAKE2 hash of `seed:key` and holds
out the first round(fraction x count) of them, within each group when `groups` is given (stratified).
So the split does not depend on the order of the file, and every item with the same key (the 26 letters
of a font, an emoji's skin-tone variants) lands on the same side: nothing of a test font or emoji is
seen in training. The run's config.yaml records `data.test_fraction` and `data.split_seed`; with the
names stored in the data file, that fixes the split.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


def key_rank(key: str, seed: int) -> bytes:
    """The sort key of one name: 8 bytes of BLAKE2b of `seed:key` (stable across machines and Python runs)."""
    return hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()


def held_out(keys: Sequence[str], test_fraction: float, seed: int, groups: Sequence[int] | None = None,
             keep_one: bool = True) -> np.ndarray:
    """(N,) bool, True for the items whose key is held out for the test split.

    In each group (all items one group when `groups` is None) round(test_fraction x distinct keys) keys
    are held out, at most all but one when `keep_one` (so every group still trains)."""
    keys = [str(k) for k in keys]
    group_of = [0] * len(keys) if groups is None else [int(g) for g in groups]
    if len(group_of) != len(keys):
        raise ValueError(f"{len(keys)} keys but {len(group_of)} groups")
    by_group: dict[int, set[str]] = {}
    for k, g in zip(keys, group_of):
        by_group.setdefault(g, set()).add(k)
    test: set[tuple[int, str]] = set()
    for g, names in by_group.items():
        n_test = int(round(len(names) * test_fraction))
        if keep_one:
            n_test = min(n_test, len(names) - 1)
        ranked = sorted(names, key=lambda k: key_rank(k, seed))
        test.update((g, k) for k in ranked[:n_test])
    return np.array([(g, k) in test for k, g in zip(keys, group_of)], dtype=bool)
