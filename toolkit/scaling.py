"""Loss against training compute: power-law fits, seed-bootstrap intervals, crossings and gap trends.

Pure numbers in, numbers out (numpy and scipy only), so the statistics are testable without training.
A *point* is one finished run: (variant, rung, seed, training FLOPs, final val loss).

- :func:`fit_power_law` fits L = a * (C/C0)^-b + c (Kaplan et al. 2020, Hoffmann et al. 2022) or,
  when the irreducible loss c cannot be resolved from the data, L = a * (C/C0)^-b, and says which and why.
- :func:`analyse` fits every variant, bootstraps the seeds (resampled within each rung, the same
  draw for every variant: a seed is one data order shared by all of them) for intervals on the
  exponent b, finds where each variant's curve crosses the baseline's, and reads the trend of the
  compute-matched gap between the smallest and largest compute both variants reached.
"""
from __future__ import annotations

import math
from typing import Sequence

import attrs
import numpy as np

FULL, TWO = "a*C^-b + c", "a*C^-b"
CONFIDENCE = 0.95
N_BOOT = 300  # bootstrap draws: percentile intervals at 95% are stable to about +-0.01 of their width
# the full form must beat the two-parameter one by this much AICc: below 2 both have substantial support
# (Burnham and Anderson 2002), and the simpler one is kept
MIN_AICC_GAIN = 2.0
MIN_POINTS_FULL = 4  # distinct compute values below which three parameters leave nothing to judge c by


def train_flops(flops_per_token: float, tokens: float) -> float:
    """Training FLOPs of a run: forward + backward (2 x forward), as `inspect` counts them."""
    return 3.0 * flops_per_token * tokens


@attrs.frozen
class Point:
    variant: str
    rung: str
    seed: int
    compute: float  # training FLOPs
    loss: float  # final validation loss


@attrs.frozen
class Fit:
    """A fitted curve L(C) = a * (C / c0)^-b + c (c = 0 in the two-parameter form) and why this form."""

    form: str  # FULL or TWO
    a: float
    b: float
    c: float
    c0: float  # the compute the fit is normalised by (the geometric mean of the points')
    rss: float
    n: int
    why: str = ""
    c_se: float | None = None  # standard error of c (the full form only)

    def __call__(self, compute):
        return self.a * (np.asarray(compute, dtype=float) / self.c0) ** -self.b + self.c


def _aicc(rss: float, n: int, k: int) -> float:
    """Akaike's criterion with the small-sample correction, for Gaussian residuals."""
    if n - k - 1 <= 0:
        return math.inf
    return n * math.log(max(rss, 1e-300) / n) + 2 * k + 2 * k * (k + 1) / (n - k - 1)


def _fit_two(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """a, b, rss of y = a x^-b: least squares in loss space, started from the log-log line."""
    from scipy.optimize import least_squares

    slope, icept = np.polyfit(np.log(x), np.log(y), 1)
    res = least_squares(lambda p: p[0] * x ** -p[1] - y, [math.exp(icept), -slope], method="lm")
    a, b = res.x
    return float(a), float(b), float(np.sum(res.fun ** 2))


def _fit_full(x: np.ndarray, y: np.ndarray, start: tuple[float, float], c_starts: tuple[float, ...] = ()):
    """a, b, c, rss, se(c), and whether c sits on a bound, of y = a x^-b + c with a > 0, b in (0, 4), 0 <= c < min(y)."""
    from scipy.optimize import least_squares

    hi_c = float(np.min(y)) * (1 - 1e-9)
    best = None
    for c_start in c_starts or (0.5 * hi_c, 0.9 * hi_c, 0.1 * hi_c):  # c is the hard one: a few starts
        c_start = min(c_start, 0.999 * hi_c)
        a0 = start[0] if c_starts else max(float(np.mean(y)) - c_start, 1e-6)
        res = least_squares(lambda p: p[0] * x ** -p[1] + p[2] - y, [a0, max(start[1], 0.01), c_start],
                            bounds=([1e-12, 1e-6, 0.0], [np.inf, 4.0, hi_c]))
        if best is None or res.cost < best.cost:
            best = res
    a, b, c = (float(t) for t in best.x)
    rss = float(np.sum(best.fun ** 2))
    se = None
    dof = len(y) - 3
    if dof > 0:
        try:
            cov = np.linalg.inv(best.jac.T @ best.jac) * rss / dof
            se = float(math.sqrt(cov[2, 2])) if cov[2, 2] >= 0 else None
        except np.linalg.LinAlgError:
            se = None
    on_bound = c <= 1e-6 * hi_c or c >= hi_c * (1 - 1e-4)
    return a, b, c, rss, se, on_bound


def fit_power_law(compute: Sequence[float], loss: Sequence[float], form: str | None = None,
                  near: Fit | None = None) -> Fit:
    """The power law through (compute, loss); ``form`` forces FULL or TWO, else the data choose.
    ``near``: a fit of similar data to start from (the bootstrap's draws start from the full data's fit).

    The full form is kept only when c is resolved: at least MIN_POINTS_FULL distinct computes, c off
    its bounds (0 and the lowest loss), at least 2 standard errors from 0, and an AICc at least
    MIN_AICC_GAIN lower than the two-parameter form's (the third parameter must pay for itself).
    Otherwise the two-parameter form, whose exponent then also absorbs the approach to the
    irreducible loss (it reads lower than the full form's b would be).
    """
    C = np.asarray(compute, dtype=float)
    y = np.asarray(loss, dtype=float)
    c0 = float(np.exp(np.mean(np.log(C))))
    x = C / c0
    n = len(y)
    a2, b2, rss2 = _fit_two(x, y)
    two = Fit(TWO, a2, b2, 0.0, c0, rss2, n)
    if form == TWO:
        return two
    distinct = len(np.unique(C))
    if form is None and distinct < MIN_POINTS_FULL:
        return attrs.evolve(two, why=f"only {distinct} compute values: with three parameters nothing is left "
                                     f"to tell c from the exponent (needs {MIN_POINTS_FULL})")
    if near is not None and near.form == FULL:  # same normalisation needed: rescale a to this c0
        a, b, c, rss, se, on_bound = _fit_full(x, y, (near.a * (c0 / near.c0) ** -near.b, near.b), (near.c,))
    else:
        a, b, c, rss, se, on_bound = _fit_full(x, y, (a2, b2))
    full = Fit(FULL, a, b, c, c0, rss, n, c_se=se)
    if form == FULL:
        return full
    gain = _aicc(rss2, n, 2) - _aicc(rss, n, 3)
    if on_bound:
        why = f"c went to its bound ({c:.3g}; allowed 0 to the lowest loss {np.min(y):.3g}): not resolved"
    elif se is None or not math.isfinite(se) or c < 2 * se:
        why = f"c = {c:.3g} ± {se if se is not None else float('nan'):.2g} (standard error) is within 2 errors of 0: not resolved"
    elif gain < MIN_AICC_GAIN:
        why = (f"the third parameter does not pay for itself (AICc {gain:+.1f} in favour of the full form; "
               f"needs {MIN_AICC_GAIN:g})")
    else:
        return attrs.evolve(full, why=f"c = {c:.3g} ± {se:.2g} resolved, AICc {gain:.1f} lower than the two-parameter form")
    return attrs.evolve(two, why=why)


def crossings(f: Fit, g: Fit, lo: float, hi: float, span: float = 1e3) -> list[float]:
    """Computes where curves f and g are equal, searched from lo/span to hi*span (log-spaced, refined by brentq)."""
    from scipy.optimize import brentq

    grid = np.logspace(math.log10(lo / span), math.log10(hi * span), 400)
    d = f(grid) - g(grid)
    out = []
    for i in np.nonzero(np.sign(d[:-1]) * np.sign(d[1:]) < 0)[0]:
        out.append(float(brentq(lambda c: float(f(c) - g(c)), grid[i], grid[i + 1])))
    return out


# -- several variants ---------------------------------------------------------------------------
@attrs.frozen
class VariantFit:
    variant: str
    fit: Fit | None
    b_low: float | None  # the exponent's bootstrap interval (None: one seed, or too few draws)
    b_high: float | None
    c_min: float  # the compute range of its points
    c_max: float
    rungs: int
    seeds: int  # the fewest seeds any of its rungs has


@attrs.frozen
class Trend:
    """A variant's compute-matched gap to the baseline (variant - baseline; negative: the variant is ahead)."""

    variant: str
    c_lo: float  # the compute range both reached
    c_hi: float
    gap_lo: float  # fitted gaps at c_lo and c_hi
    gap_hi: float
    change_low: float | None  # bootstrap interval of gap_hi - gap_lo
    change_high: float | None
    verdict: str
    crossings: tuple[float, ...]  # computes where the fitted curves cross, within lo/1e3 .. hi*1e3


@attrs.frozen
class Analysis:
    fits: tuple[VariantFit, ...]
    trends: tuple[Trend, ...]
    draws: int  # bootstrap draws made


def _by_variant(points: Sequence[Point]) -> dict[str, list[Point]]:
    out: dict[str, list[Point]] = {}
    for p in points:
        out.setdefault(p.variant, []).append(p)
    return out


def _percentile(values: list[float], centre: float, seeds: int) -> tuple[float | None, float | None]:
    """The bootstrap's percentile interval, widened about ``centre`` by sqrt(n / (n - 1)): resampling n
    seeds gives a mean (n - 1)/n of its variance, which matters at the 2-4 seeds an ablation has."""
    if len(values) < 20 or seeds < 2:
        return None, None
    lo, hi = np.percentile(values, [50 * (1 - CONFIDENCE), 50 * (1 + CONFIDENCE)])
    k = math.sqrt(seeds / (seeds - 1))
    return float(centre + k * (lo - centre)), float(centre + k * (hi - centre))


def _verdict(gap_lo: float, gap_hi: float, lo: float | None, hi: float | None, seeds: int) -> str:
    """grows / shrinks / constant, reading the interval of (gap at the largest compute - gap at the smallest)."""
    within = "within the sweep"
    if gap_lo * gap_hi < 0:
        return f"gap reverses sign {within}"
    if lo is None:
        return f"{'1 seed' if seeds < 2 else 'too few bootstrap fits'}: no interval"
    if lo <= 0 <= hi:
        return f"gap constant with scale, {within}"
    return f"gap {'grows' if (hi < 0) == (gap_lo < 0) else 'shrinks'} with scale, {within}"


def analyse(points: Sequence[Point], baseline: str, n_boot: int = N_BOOT, seed: int = 0) -> Analysis:
    """Fit every variant with at least two rungs, bootstrap its seeds, and compare each with ``baseline``."""
    groups = {v: ps for v, ps in _by_variant(points).items() if len({p.rung for p in ps}) >= 2}
    fits = {}
    for v, ps in list(groups.items()):
        try:
            fits[v] = fit_power_law([p.compute for p in ps], [p.loss for p in ps])
        except (RuntimeError, ValueError, np.linalg.LinAlgError):
            del groups[v]  # the optimiser failed: this variant goes unfitted rather than taking the report down
    # one draw: for each rung, its seeds resampled with replacement, the same for every variant
    rungs = sorted({p.rung for p in points})
    seeds_of = {r: sorted({p.seed for p in points if p.rung == r}) for r in rungs}
    index = {(p.variant, p.rung, p.seed): p for p in points}
    rng = np.random.default_rng(seed)
    boot: dict[str, list[Fit]] = {v: [] for v in groups}
    pair_boot: dict[str, list[tuple[Fit, Fit]]] = {v: [] for v in groups}
    draws = n_boot if max((len(s) for s in seeds_of.values()), default=0) > 1 else 0
    for _ in range(draws):
        pick = {r: rng.choice(seeds_of[r], size=len(seeds_of[r])) for r in rungs}
        this = {}
        for v in groups:
            ps = [index[(v, r, s)] for r in rungs for s in pick[r] if (v, r, s) in index]
            if len({p.rung for p in ps}) < 2:
                continue
            try:
                this[v] = fit_power_law([p.compute for p in ps], [p.loss for p in ps], form=fits[v].form, near=fits[v])
            except (RuntimeError, ValueError, np.linalg.LinAlgError):
                continue  # a draw the optimiser cannot fit is left out (the count of draws says how many)
            boot[v].append(this[v])
        if baseline in this:
            for v in this:
                pair_boot[v].append((this[v], this[baseline]))
    out_fits = []
    for v, ps in groups.items():
        n_seeds = min(len({p.seed for p in ps if p.rung == r}) for r in {p.rung for p in ps})
        lo, hi = _percentile([f.b for f in boot[v]], fits[v].b, n_seeds)
        cs = [p.compute for p in ps]
        out_fits.append(VariantFit(v, fits[v], lo, hi, min(cs), max(cs), len({p.rung for p in ps}), n_seeds))
    trends = []
    base = next((f for f in out_fits if f.variant == baseline), None)
    for vf in out_fits:
        if base is None or vf.variant == baseline:
            continue
        c_lo, c_hi = max(vf.c_min, base.c_min), min(vf.c_max, base.c_max)
        if c_lo >= c_hi:  # no compute both reached: compare over the union, and the verdict says so
            c_lo, c_hi = min(vf.c_min, base.c_min), max(vf.c_max, base.c_max)
        g_lo = float(vf.fit(c_lo) - base.fit(c_lo))
        g_hi = float(vf.fit(c_hi) - base.fit(c_hi))
        changes = [float((f(c_hi) - b(c_hi)) - (f(c_lo) - b(c_lo))) for f, b in pair_boot[vf.variant]]
        lo, hi = _percentile(changes, g_hi - g_lo, min(vf.seeds, base.seeds))
        cross = crossings(vf.fit, base.fit, min(vf.c_min, base.c_min), max(vf.c_max, base.c_max))
        trends.append(Trend(vf.variant, c_lo, c_hi, g_lo, g_hi, lo, hi, _verdict(g_lo, g_hi, lo, hi, vf.seeds),
                            tuple(cross)))
    return Analysis(tuple(out_fits), tuple(trends), draws)
