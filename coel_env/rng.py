"""Named random streams: one flat draw per layout, read back as views by name (no hand-kept offsets).

A `Layout` is an ordered mapping name -> shape over one flat block of random numbers (standard normals or uniforms
in [0, 1)). Drawing a layout is exactly one draw of `layout.size` numbers, so the numbers a block gets depend only
on the blocks before it: code reads `z["arrival"]` instead of `z[:, o:o + S]`.

The rule that keeps seeded trajectories stable: a new stream is APPENDED at the end of its layout (`extend`), or
drawn from a generator of its own (e.g. `rng.spawn(1)[0]`). Inserting or resizing a block in the middle shifts every
block after it and changes every trajectory under a fixed seed (tests/backend/test_golden.py catches that).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np

Kind = Literal["normal", "uniform"]


class Layout:
    """Ordered named blocks of one flat random draw (`kind`: standard normals or uniforms in [0, 1))."""

    def __init__(self, blocks: Mapping[str, int | tuple[int, ...]], kind: Kind = "normal"):
        if kind not in ("normal", "uniform"):
            raise ValueError(f"kind: unknown '{kind}'; allowed: normal, uniform")
        self.kind: Kind = kind
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.slices: dict[str, slice] = {}
        o = 0
        for name, shape in blocks.items():
            shp = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
            n = int(np.prod(shp, dtype=np.int64))
            self.shapes[name] = shp
            self.slices[name] = slice(o, o + n)
            o += n
        self.size = o

    def __repr__(self) -> str:
        body = ", ".join(f"{k}={v}" for k, v in self.shapes.items())
        return f"Layout({self.kind}: {body}; size {self.size})"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.shapes)

    def extend(self, blocks: Mapping[str, int | tuple[int, ...]]) -> Layout:
        """A new layout with `blocks` appended after the existing ones (which keep their numbers)."""
        clash = set(blocks) & set(self.shapes)
        if clash:
            raise ValueError(f"blocks: '{sorted(clash)[0]}' already in the layout")
        return Layout({**self.shapes, **blocks}, self.kind)

    def views(self, buf: np.ndarray) -> dict[str, np.ndarray]:
        """Views by name onto `buf` [..., size] (leading axes kept): block `name` is [..., *shape], no copies."""
        if buf.shape[-1] != self.size:
            raise ValueError(f"buf: last axis {buf.shape[-1]}; this layout needs {self.size}")
        lead = buf.shape[:-1]
        return {k: np.reshape(buf[..., sl], (*lead, *self.shapes[k]), copy=False) for k, sl in self.slices.items()}

    def draw(self, rng: np.random.Generator, lead: tuple[int, ...] = ()) -> dict[str, np.ndarray]:
        """One fresh draw of [*lead, size] numbers, returned as views by name."""
        size = (*lead, self.size)
        buf = rng.standard_normal(size) if self.kind == "normal" else rng.random(size)
        return self.views(buf)

    def draw_into(self, rng: np.random.Generator, row: np.ndarray) -> None:
        """Fill `row` [size] (e.g. one env's row of a persistent buffer) in place with one draw."""
        if self.kind == "normal":
            rng.standard_normal(out=row)
        else:
            rng.random(out=row)


def draw(
    rng: np.random.Generator,
    blocks: Mapping[str, int | tuple[int, ...]],
    kind: Kind = "normal",
    lead: tuple[int, ...] = (),
) -> dict[str, np.ndarray]:
    """Draw the named blocks at once (in order) and return them by name: `Layout(blocks, kind).draw(rng, lead)`."""
    return Layout(blocks, kind).draw(rng, lead)
