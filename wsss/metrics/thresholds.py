"""Sweep thresholds: parsing, checking, and exact comparison of float maps with decimal thresholds.

Thresholds compare exactly as the real numbers the floats denote, whatever the maps' dtype: t is rounded down
to that dtype once, never to nearest (so float32(0.3) = 0.30000001 is above t = 0.3, a tie only with
t = float32(0.3)). `Binner` bins a value by the count of thresholds strictly below it, in O(1) per value.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

import torch
from torch import Tensor

log = logging.getLogger(__name__)


def parse_thresholds(spec: str | float | Sequence[float]) -> list[float]:
    """Thresholds from a range spec, a comma list, a number or a sequence.

    `"start:stop:step"` is an inclusive decimal range: `"0.00:0.95:0.01"` gives 0.0, 0.01, ..., 0.95
    (96 values), each equal to the float of its decimal literal: the arithmetic is done in `Decimal`, so there
    is no 0.07000000000000001 and no end point lost to rounding. `"0.1,0.2"` and `"0.3"` list values.
    Sequences and numbers are taken as they are.

    Args:
        spec: The thresholds.

    Returns:
        The thresholds as floats, in the given order (a range ascends).

    Raises:
        ValueError: On a malformed spec, a non-positive step or `stop < start`.
    """
    if isinstance(spec, int | float):
        return [float(spec)]
    if not isinstance(spec, str):
        return [float(t) for t in spec]
    text = spec.strip()
    try:
        if ":" in text:
            parts = [Decimal(p.strip()) for p in text.split(":")]
            if len(parts) != 3:
                raise ValueError(f"threshold range {spec!r} must be 'start:stop:step'")
            start, stop, step = parts
            if step <= 0 or stop < start:
                raise ValueError(f"threshold range {spec!r} needs step > 0 and stop >= start")
            n = int((stop - start) / step)  # decimal quotient, floored: the last step not past stop
            return [float(start + i * step) for i in range(n + 1)]
        return [float(Decimal(p.strip())) for p in text.split(",") if p.strip()]
    except InvalidOperation as e:
        raise ValueError(f"cannot parse thresholds {spec!r}") from e


def check_thresholds(thresholds: Sequence[float]) -> list[float]:
    """Validate sweep thresholds: non-empty, finite, within [0, 1], strictly increasing."""
    out = [float(t) for t in thresholds]
    if not out:
        raise ValueError("no thresholds given")
    for t in out:
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"threshold {t} outside [0, 1]")
    for a, b in itertools.pairwise(out):
        if not a < b:
            raise ValueError(f"thresholds must increase strictly, got {a} then {b}")
    return out


def _round_down(t: Tensor, dtype: torch.dtype) -> Tensor:
    """Round float64 `t` down to `dtype` (largest value <= t): for x of that dtype, x > t <=> x > result."""
    u = t.to(dtype)
    return torch.where(u.to(torch.float64) > t, torch.nextafter(u, torch.full_like(u, -math.inf)), u)


@functools.lru_cache(maxsize=256)
def strict_bound(t: float, dtype: torch.dtype) -> float:
    """`_round_down(t)` as a Python float, which a comparison with a `dtype` tensor uses unchanged."""
    return float(_round_down(torch.tensor(float(t), dtype=torch.float64), dtype))


class Binner:
    """Exact, cheap binning of values by the thresholds strictly below them: bin(x) = #{j : t_j < x}.

    Thresholds lie in [0, 1] and are first rounded down to the values' dtype, which keeps `x > t` exact. The
    unit interval is cut into Q = 2^k cells [q/Q, (q+1)/Q), fine enough that each holds at most one
    threshold. A value maps to its cell q and a flag, x > (the threshold inside q, or +inf), and
    `bin = below[q] + flag` with `below[q]` the count of thresholds under the cell: a multiply (exact, Q is
    a power of two), one table lookup and a compare per value instead of a binary search. Callers histogram
    (flag, cell) and map it to bins afterwards on the small histogram (`bin_of`). Values below 0 and NaN land
    in cell 0 and values above 1 in cell Q, still exact for thresholds in [0, 1] (NaN counts no threshold).
    If no Q <= 2^16 separates the thresholds, cells are the bins themselves, found by `searchsorted`.
    """

    MAX_CELLS = 1 << 16

    def __init__(self, thresholds: Sequence[float], dtype: torch.dtype, device: torch.device):
        t64 = torch.tensor(thresholds, dtype=torch.float64)
        u = _round_down(t64, dtype)  # (T,) ascending; x > t_j <=> x > u_j for x of this dtype
        self.q = self._cell_count(u)
        if self.q is None:
            log.debug("thresholds too close for the cell table; binning with searchsorted")
            self.sorted = u.to(device)
            self.n_cells = len(u) + 1
            below = torch.arange(self.n_cells)
        else:
            self.n_cells = self.q + 1
            edges = torch.arange(self.n_cells, dtype=torch.float64) / self.q  # (Q+1,) cell starts
            below = torch.searchsorted(u.to(torch.float64), edges, right=False)  # thresholds < cell start
            inside = torch.full((self.n_cells,), math.inf, dtype=dtype)
            inside[(u.to(torch.float64) * self.q).floor().long()] = u
            self.inside = inside.to(device)  # (Q+1,)
        # (2 * n_cells,) bin at flag * n_cells + cell; flag 1 only occurs below a threshold, hence the clamp
        # (it keeps the never-used entries in range).
        self.bin_of = torch.cat([below, (below + 1).clamp_(max=len(u))]).to(device)

    @classmethod
    def _cell_count(cls, u: Tensor) -> int | None:
        """The smallest power of two Q whose cells hold at most one of the sorted thresholds `u`."""
        u64 = u.to(torch.float64)
        if len(u64) > 1 and not bool((u64[1:] > u64[:-1]).all()):
            return None  # distinct thresholds rounded onto one value of this dtype
        q = 1
        while q <= cls.MAX_CELLS:
            cell = (u64 * q).floor()
            if len(cell) < 2 or bool((cell[1:] > cell[:-1]).all()):
                return q
            q *= 2
        return None

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Cells (N,) int32 and flags (N,) bool (None without a cell table) of the flattened `x`."""
        x = x.reshape(-1)
        if self.q is None:
            return torch.searchsorted(self.sorted, x, right=False, out_int32=True), None
        # x * q is exact (q is a power of two). NaN survives the float clamp and converts to INT_MIN (x86) or
        # 0 (CUDA, ARM); the integer clamp sends it to cell 0, where it counts no threshold.
        cell = (x * self.q).clamp_(0, self.q).to(torch.int32).clamp_(min=0)
        return cell, x > torch.index_select(self.inside, 0, cell)


def score_bins(x: Tensor, n: int) -> Tensor:
    """(N,) int32 floor(n * clip(x, 0, 1)): bin i holds scores in [i/n, (i+1)/n), bin n the score 1.

    The product is formed in float64, where it is exact for float16/float32 scores and n < 2^29, so
    `bin >= i <=> score >= i/n` holds for the exact rational i/n. NaN falls into bin 0.
    """
    scaled = x.reshape(-1).to(torch.float64).mul_(n).clamp_(0, n)
    return scaled.to(torch.int32).clamp_(min=0)
