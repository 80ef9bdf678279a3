"""Range checks of config numbers, raised when a config is parsed and naming the offending key."""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any


def check_numbers(prefix: str, values: Mapping[str, Any], *, nonnegative: Iterable[str] = (),
                  optional_nonnegative: Iterable[str] = (), positive: Iterable[str] = (), counts: Iterable[str] = (),
                  optional_counts: Iterable[str] = (), indices: Iterable[str] = ()) -> None:
    """Refuse ``values[name]`` out of its range with ``ValueError("<prefix>.<name> must be ...")``:
    ``nonnegative`` / ``positive`` finite numbers >= 0 / > 0, ``counts`` integers >= 1, ``indices``
    integers >= 0; the ``optional_*`` kinds also take None."""
    for names, ok, want in (
        (nonnegative, lambda v: v >= 0, "a number >= 0"),
        (optional_nonnegative, lambda v: v is None or v >= 0, "null or a number >= 0"),
        (positive, lambda v: v > 0, "a number > 0"),
        (counts, lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
        (optional_counts, lambda v: v is None or (isinstance(v, int) and v >= 1), "null or an integer >= 1"),
        (indices, lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
    ):
        for name in names:
            v = values[name]
            bad = isinstance(v, bool) or (v is not None and not isinstance(v, (int, float)))
            if bad or (isinstance(v, float) and not math.isfinite(v)) or not ok(v):
                raise ValueError(f"{prefix}.{name} must be {want}, got {v!r}")
