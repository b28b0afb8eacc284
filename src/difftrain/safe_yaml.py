"""Reading YAML with limits: every YAML difftrain reads (recipes, config.yaml, overrides, the report) goes here.

`yaml.safe_load` never runs code, but it does not bound what a short text can become: nine lines of
aliases (a "billion laughs") compose to 10^9 nodes when expanded, which `str()` or a page then
writes out in full. `load_yaml` is `yaml.safe_load` with three limits, each far above any config
(a resolved config.yaml is ~4 KB, ~300 nodes, 3 levels deep):

- the text: at most MAX_CHARS characters;
- the nodes, counting an alias as the whole node it repeats: at most MAX_NODES;
- the nesting: at most MAX_DEPTH levels (the composer is recursive; this stays far below Python's
  recursion limit).

A text over a limit, an alias to a node that contains it, or a scalar Python cannot build (an
integer of more than 4300 digits, a date such as 2024-13-45) raises YAMLLimitError, a yaml.YAMLError,
so a caller's `except yaml.YAMLError` catches it with the parse errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

MAX_CHARS = 1 << 20
MAX_NODES = 100_000
MAX_DEPTH = 64


class YAMLLimitError(yaml.YAMLError):
    """A YAML text that is too large, too deep, expands too far, or holds a value that cannot be built."""


class _LimitedLoader(yaml.SafeLoader):
    """SafeLoader that counts the nodes it composes, an alias as the size of the node it names."""

    def __init__(self, text: str):
        super().__init__(text)
        self.nodes, self.depth = 0, 0
        self.sizes: dict[yaml.Node, int] = {}  # expanded size of each composed node

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            node = super().compose_node(parent, index)
            if node not in self.sizes:  # still being composed: the alias is inside its own anchor
                raise YAMLLimitError(f"an alias repeats a node that contains it{_where(mark)}")
            self._count(self.sizes[node], mark)
            return node
        mark = self.peek_event().start_mark
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise YAMLLimitError(f"nested more than {MAX_DEPTH} levels deep{_where(mark)}")
        start = self.nodes
        node = super().compose_node(parent, index)
        self.depth -= 1
        self._count(1, mark)
        self.sizes[node] = self.nodes - start
        return node

    def _count(self, n: int, mark) -> None:
        self.nodes += n
        if self.nodes > MAX_NODES:
            raise YAMLLimitError(f"more than {MAX_NODES:,} values once its aliases are expanded{_where(mark)}")


def _where(mark) -> str:
    return f" (line {mark.line + 1}, column {mark.column + 1})"


def load_yaml(text: str) -> Any:
    """`yaml.safe_load(text)` within the limits above; YAMLLimitError (a yaml.YAMLError) past them."""
    if len(text) > MAX_CHARS:
        raise YAMLLimitError(f"{len(text):,} characters, more than the {MAX_CHARS:,} a config may have")
    loader = _LimitedLoader(text)
    try:
        return loader.get_single_data()
    except (ValueError, OverflowError, RecursionError) as e:  # a scalar Python cannot build (a YAMLError passes)
        raise YAMLLimitError(f"a value cannot be read: {e}") from None
    finally:
        loader.dispose()


def read_yaml_text(path: Path) -> str:
    """The text of a YAML file, read no further than MAX_CHARS bytes; YAMLLimitError when it is larger or not
    UTF-8 (OSError as open raises it)."""
    with open(path, "rb") as f:
        data = f.read(MAX_CHARS + 1)
    if len(data) > MAX_CHARS:
        raise YAMLLimitError(f"larger than {MAX_CHARS:,} bytes, more than a config may have")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise YAMLLimitError(f"not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r})") from None
