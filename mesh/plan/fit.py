"""Non-negative linear fits that know their own uncertainty and the range of data they saw.

A `LinearFit` is y ~ sum(coef_i * x_i) with every coef_i >= 0 (a cost cannot be negative), fitted by
least squares over rows of measurements. Besides the coefficients it keeps
- the coefficients' covariance (from the residual scatter), so a prediction at x comes with a
  standard error that grows as x moves away from the data (`se`);
- each column's range over the rows (per unit of the first column, the "per step" view), so a caller
  can tell when it predicts outside what was measured (`outside`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence


def nnls(rows: Sequence[Sequence[float]], y: Sequence[float]) -> tuple[list[float], list[int]]:
    """Non-negative least squares for a handful of columns: solve, drop the column with the most
    negative coefficient, repeat. Returns (coefficients, the columns kept)."""
    import numpy as np
    A, b = np.asarray(rows, dtype=float), np.asarray(y, dtype=float)
    active = list(range(A.shape[1]))
    coef = np.zeros(A.shape[1])
    while active:
        scale = np.linalg.norm(A[:, active], axis=0)
        scale[scale == 0] = 1.0
        x, *_ = np.linalg.lstsq(A[:, active] / scale, b, rcond=None)
        x = x / scale
        if (x >= 0).all():
            coef[:] = 0
            coef[active] = x
            return coef.tolist(), active
        active.pop(int(np.argmin(x)))
    return coef.tolist(), []


@dataclass
class LinearFit:
    names: tuple[str, ...]
    coef: list[float]
    cov: list[list[float]] = field(default_factory=list)  # over all columns (zeros for dropped ones)
    rows: int = 0
    residual: float = 0.0  # relative RMS error over the rows (RMS / mean of y)
    lo: list[float] = field(default_factory=list)  # per column: min over rows of x_i / x_0
    hi: list[float] = field(default_factory=list)  # ... max

    def __call__(self, x: Sequence[float]) -> float:
        return sum(c * v for c, v in zip(self.coef, x))

    def se(self, x: Sequence[float]) -> float:
        """Standard error of the fitted mean at x."""
        if not self.cov:
            return 0.0
        n = len(self.coef)
        v = sum(x[i] * self.cov[i][j] * x[j] for i in range(n) for j in range(n))
        return math.sqrt(max(v, 0.0))

    def outside(self, x: Sequence[float], slack: float = 0.15) -> list[str]:
        """Columns (by name) where x, per unit of its first column, lies more than `slack` (relative)
        outside the range the rows covered."""
        if not self.lo or not x[0]:
            return []
        out = []
        for i in range(1, len(x)):
            v = x[i] / x[0]
            if v > self.hi[i] * (1 + slack) + 1e-12 or v < self.lo[i] * (1 - slack) - 1e-12:
                out.append(self.names[i])
        return out

    def as_dict(self) -> dict:
        return {"terms": dict(zip(self.names, self.coef)), "rows": self.rows, "residual": self.residual,
                "stderr": {n: math.sqrt(max(self.cov[i][i], 0.0)) if self.cov else 0.0
                           for i, n in enumerate(self.names)}}


def fit(names: Sequence[str], rows: Sequence[Sequence[float]], y: Sequence[float], min_rows: int | None = None,
        what: str = "a step-time fit", trim: float | None = None) -> LinearFit:
    """Fit y ~ rows . coef (coef >= 0). ValueError when there are fewer than `min_rows` rows (default:
    columns + 2), naming `what`. `trim`: refit without the rows whose residual lies more than `trim`
    robust standard deviations (1.4826 x the median absolute deviation) from the median residual:
    single steps another process held up, say, should not pull a law fitted to thousands."""
    import numpy as np
    need = min_rows if min_rows is not None else len(names) + 2
    if len(rows) < need:
        raise ValueError(f"{what} needs at least {need} measured steps or intervals, the profiles hold "
                         f"{len(rows)}: profile longer or at a higher rate")
    coef, active = nnls(rows, y)
    if trim is not None:
        for _ in range(2):
            A, b = np.asarray(rows, dtype=float), np.asarray(y, dtype=float)
            res = b - A @ np.asarray(coef)
            med = float(np.median(res))
            mad = 1.4826 * float(np.median(np.abs(res - med))) or 1e-12
            keep = np.abs(res - med) <= trim * mad
            if keep.all() or keep.sum() < need:
                break
            rows = [r for r, k in zip(rows, keep) if k]
            y = [v for v, k in zip(y, keep) if k]
            coef, active = nnls(rows, y)
    A, b = np.asarray(rows, dtype=float), np.asarray(y, dtype=float)
    pred = A @ np.asarray(coef)
    res = b - pred
    mean = float(np.mean(np.abs(b))) or 1.0
    dof = max(len(b) - len(active), 1)
    sigma2 = float(res @ res) / dof
    cov = np.zeros((len(names), len(names)))
    if active:
        sub = A[:, active]
        try:
            inv = np.linalg.inv(sub.T @ sub)
            for a, i in enumerate(active):
                for c, j in enumerate(active):
                    cov[i, j] = sigma2 * inv[a, c]
        except np.linalg.LinAlgError:
            pass
    base = np.where(A[:, 0] > 0, A[:, 0], 1.0)
    per = A / base[:, None]
    return LinearFit(tuple(names), list(coef), cov.tolist(), len(b), math.sqrt(float(res @ res) / len(b)) / mean,
                     per.min(0).tolist(), per.max(0).tolist())


def fixed(names: Sequence[str], coef: Sequence[float]) -> LinearFit:
    """A law that was not fitted (an assumption): no covariance, no data range."""
    return LinearFit(tuple(names), list(coef))
