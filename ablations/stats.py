"""Statistics of a sweep: per-cell confidence intervals, one effect per sweep and its verdict.

Pure functions on plain arrays (and, at the end, the pandas glue a sweep table needs).

Design. A sweep is paired: every cell is distilled with the same distillation seeds and each
set is evaluated with the same evaluation-network seeds (ablations/sweep.py), so a *unit*
is one (distillation seed, evaluation network) pair and `acc[u, c]` is unit u's final-epoch
test accuracy in cell c. Resampling units jointly across cells (the same rows for every
cell) keeps the pairing, so the noise cells share cancels in their differences.

- Per cell: mean, sd, a t-based 95% CI of the mean, n.
- E and M sweeps: the least-squares slope of the cell means on ln(x), with its standard
  error from a seeded bootstrap over units and a t quantile (n - 1 degrees of freedom) for
  the 95% CI. Why not the bootstrap's percentiles: with 10 units they cover 89-92% instead of
  95% (measured on simulated null sweeps, tests/test_stats.py), so too many "effects" would
  be declared; the bootstrap SE (x sqrt(n / (n - 1))) with t(n - 1) covers 94-95%.
- Table 4 (and the λ re-evaluation): the paired difference of each row against the previous
  one, mean of the per-unit differences with a t-based 95% CI.
- Across distillation seeds (what the verdict uses when a sweep has >= 2 seeds): units that
  share a seed share a distilled set, so they are not independent, and a dud set (one seed's
  cell several points low for all its networks) is noise that pairing cannot cancel. The
  replicate is then the seed: the effect is computed per seed (on that seed's mean over its
  networks) and its CI is t(S - 1) over the S per-seed effects. Measured why (docs/results.md,
  M sweep at `resolve`): over units the slope's CI was +0.18 to +0.93, yet seed 0 was flat
  (+0.08) and seed 1's +1.04 came from dud sets at M = 1 and 4. The unit-level CI stays in the
  table (`effect_nets_*`) as the part of the noise the evaluation networks add.
- Verdict: `reproduced` (the CI excludes 0 and the effect has the paper's sign),
  `contradicted` (the CI excludes 0, opposite sign), `unresolved` (the CI contains 0).
- The smallest effect the budget could detect: (t_{0.975} + t_{0.80}) x SE with the CI's
  degrees of freedom, the true effect a two-sided 5% test finds with 80% power (2.8 x SE for
  many degrees of freedom; 14.1 x SE with 2 seeds, which is why sweeps want more seeds).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from scipy import stats as sps

LEVEL = 0.95
POWER = 0.80
N_BOOT = 2000
BOOT_SEED = 0
VERDICTS = ("reproduced", "contradicted", "unresolved")


@dataclass(frozen=True)
class Effect:
    """An effect with its 95% CI and standard error (NaN where it cannot be computed)."""
    estimate: float
    low: float
    high: float
    se: float
    n: int  # paired units (or distillation seeds) it rests on; its CI has n - 1 degrees of freedom
    method: str

    @property
    def detectable_factor(self) -> float:
        """(t_{0.975} + t_{0.80}) with n - 1 degrees of freedom: 80% power at two-sided 5%."""
        if self.n < 2:
            return math.nan
        return float(sps.t.ppf(0.5 + LEVEL / 2, self.n - 1) + sps.t.ppf(POWER, self.n - 1))

    @property
    def detectable(self) -> float:
        """The smallest true effect this design finds with 80% power (two-sided 5%)."""
        return self.detectable_factor * self.se


@dataclass(frozen=True)
class EffectSpec:
    """What a sweep's effect is: `log_slope` (accuracy vs ln x, E and M) or `steps` (each
    row minus the previous one, Table 4), and the sign the paper's numbers have."""
    kind: str
    paper_sign: int = 1
    what: str = ""  # the swept quantity, for the verdict line ("E", "M")
    claim: str = ""  # what a positive effect means, when the paper has no numbers for it


# --- per cell -----------------------------------------------------------------------------------
def finite(values: Sequence[float]) -> np.ndarray:
    a = np.asarray([v for v in values if v is not None], dtype=float)
    return a[np.isfinite(a)]


def mean_ci(values: Sequence[float], level: float = LEVEL) -> dict[str, float]:
    """mean, sd (n-1), t-based CI of the mean, n; the CI is NaN below 2 values."""
    a = finite(values)
    n = len(a)
    mean = float(a.mean()) if n else math.nan
    sd = float(a.std(ddof=1)) if n > 1 else math.nan
    half = float(sps.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n) if n > 1 else math.nan
    return {"mean": mean, "sd": sd, "ci95_low": mean - half, "ci95_high": mean + half, "n": n}


# --- effects --------------------------------------------------------------------------------------
def log_slope(x: Sequence[float], y: np.ndarray) -> np.ndarray:
    """Least-squares slope of y on ln(x) along the last axis (y: (..., cells))."""
    lx = np.log(np.asarray(x, dtype=float))
    lx = lx - lx.mean()
    y = np.asarray(y, dtype=float)
    return (y - y.mean(axis=-1, keepdims=True)) @ lx / (lx @ lx)


def bootstrap_slope(acc: np.ndarray, x: Sequence[float], n_boot: int = N_BOOT, seed: int = BOOT_SEED,
                    level: float = LEVEL) -> Effect:
    """Slope of the cell means on ln(x); SE from `n_boot` resamples of the units (rows of acc,
    (units, cells)), the same rows for every cell (paired); CI = slope ± t(n-1) x SE."""
    acc = np.asarray(acc, dtype=float)
    units = acc.shape[0]
    if units == 0 or len(set(x)) < 2:
        return Effect(math.nan, math.nan, math.nan, math.nan, units, "paired bootstrap")
    estimate = float(log_slope(x, acc.mean(axis=0)))
    if units < 2:
        return Effect(estimate, math.nan, math.nan, math.nan, units, "paired bootstrap")
    rows = np.random.default_rng(seed).integers(0, units, size=(n_boot, units))
    slopes = log_slope(x, acc[rows].mean(axis=1))  # (n_boot,)
    se = float(slopes.std(ddof=1)) * math.sqrt(units / (units - 1))  # the bootstrap's plug-in variance is biased low
    half = float(sps.t.ppf(0.5 + level / 2, units - 1)) * se
    return Effect(estimate, estimate - half, estimate + half, se, units,
                  f"paired bootstrap SE ({n_boot} resamples, seed {seed}) x t({units - 1})")


def paired_difference(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> Effect:
    """mean(b - a) over paired units with a t-based CI."""
    return _t_effect(np.asarray(b, dtype=float) - np.asarray(a, dtype=float), lambda n: "paired t", level)


def across_seeds(per_seed: Sequence[float], level: float = LEVEL) -> Effect:
    """The mean of per-seed effects with a t-based CI: the distillation seed as the replicate."""
    return _t_effect(per_seed, lambda n: f"t({n - 1}) over {n} distillation seeds", level)


def _t_effect(values: Sequence[float], method, level: float) -> Effect:
    s = mean_ci(values, level)
    se = s["sd"] / math.sqrt(s["n"]) if s["n"] > 1 else math.nan
    return Effect(s["mean"], s["ci95_low"], s["ci95_high"], se, s["n"], method(s["n"]))


def verdict(effect: Effect, paper_sign: int) -> str:
    """reproduced / contradicted when the CI excludes 0 (same / opposite sign), else unresolved."""
    if not (math.isfinite(effect.low) and math.isfinite(effect.high)) or effect.low <= 0 <= effect.high:
        return "unresolved"
    return "reproduced" if (effect.estimate > 0) == (paper_sign > 0) else "contradicted"


# --- a sweep's table ------------------------------------------------------------------------------
def unit_matrix(runs, labels: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """(units, cells) accuracies from the long runs frame (columns cell, unit, test), keeping
    only the units present in every cell so the rows stay paired."""
    wide = runs.pivot_table(index="unit", columns="cell", values="test", aggfunc="first")
    wide = wide.reindex(columns=list(labels)).dropna()
    return wide.to_numpy(dtype=float), [str(u) for u in wide.index]


def seed_matrix(runs, labels: Sequence[str]) -> np.ndarray:
    """(seeds, cells): each distillation seed's mean over its networks, from the complete units
    of `unit_matrix`; (0, cells) when the runs carry no `seed` column."""
    acc, units = unit_matrix(runs, labels)
    if "seed" not in runs or not units:
        return np.empty((0, len(labels)))
    seed_of = runs.drop_duplicates("unit").set_index("unit")["seed"]
    return _seed_means(acc, seed_of.reindex(units).to_numpy())


def _seed_means(acc: np.ndarray, keys: np.ndarray) -> np.ndarray:
    return np.stack([acc[keys == k].mean(axis=0) for k in sorted(set(keys.tolist()))])


def sweep_effect(table, runs, spec: EffectSpec, n_boot: int = N_BOOT, seed: int = BOOT_SEED):
    """The table with the sweep's effect columns added, and the verdict line."""
    table = table.copy()
    labels = list(dict.fromkeys(table["cell"]))
    acc, _ = unit_matrix(runs, labels) if len(runs) else (np.empty((0, len(labels))), [])
    seeds = seed_matrix(runs, labels) if len(runs) else np.empty((0, len(labels)))
    by_seed = len(seeds) >= 2  # the seed is the replicate; one seed: networks only (conditional on its sets)
    first = table.drop_duplicates("cell").set_index("cell")
    if spec.kind == "log_slope":
        xs = [float(first.at[c, "x"]) for c in labels]
        nets = bootstrap_slope(acc, xs, n_boot, seed)
        per_seed = log_slope(xs, seeds) if len(seeds) and len(set(xs)) > 1 else np.empty(0)
        effect = across_seeds(per_seed) if by_seed else nets
        sign = spec.paper_sign
    elif spec.kind == "steps":
        paper = [first.at[c, "paper"] if "paper" in first else None for c in labels]

        def step(i: int, j: int) -> Effect:  # cell j minus cell i
            return across_seeds(seeds[:, j] - seeds[:, i]) if by_seed else paired_difference(acc[:, i], acc[:, j])

        steps = {labels[i]: (step(i - 1, i), _paper_sign(paper[i - 1], paper[i], spec.paper_sign))
                 for i in range(1, len(labels))}
        for column, value in (("delta", lambda e: e.estimate), ("delta_ci95_low", lambda e: e.low),
                              ("delta_ci95_high", lambda e: e.high), ("delta_detectable", lambda e: e.detectable)):
            table[column] = [value(steps[c][0]) if c in steps else math.nan for c in table["cell"]]
        table["delta_verdict"] = [verdict(*steps[c]) if c in steps else "" for c in table["cell"]]
        effect = step(0, len(labels) - 1) if len(labels) > 1 else _nan_effect()
        nets = paired_difference(acc[:, 0], acc[:, -1]) if len(labels) > 1 else _nan_effect()
        per_seed = seeds[:, -1] - seeds[:, 0] if len(seeds) and len(labels) > 1 else np.empty(0)
        sign = _paper_sign(paper[0], paper[-1], spec.paper_sign)
    else:
        raise ValueError(f"unknown effect kind '{spec.kind}'")
    word = verdict(effect, sign)
    table = table.assign(effect=effect.estimate, effect_ci95_low=effect.low, effect_ci95_high=effect.high,
                         effect_se=effect.se, effect_detectable=effect.detectable, effect_units=effect.n,
                         effect_method=effect.method, verdict=word,
                         effect_per_seed=" ".join(signed(v) for v in per_seed),
                         effect_nets_ci95_low=nets.low, effect_nets_ci95_high=nets.high, effect_nets_units=nets.n)
    return table, verdict_line(word, effect, spec, labels, sign, table, nets if by_seed else None, per_seed)


def _nan_effect() -> Effect:
    return Effect(math.nan, math.nan, math.nan, math.nan, 0, "paired t")


def _paper_sign(before: Any, after: Any, default: int) -> int:
    known = all(v is not None and v == v for v in (before, after))
    return (1 if after >= before else -1) if known else default


def signed(v: float) -> str:
    return "–" if v != v else f"{v:+.2f}"


def ci_text(effect: Effect) -> str:
    return f"95% CI {signed(effect.low)} to {signed(effect.high)}"


def verdict_line(word: str, effect: Effect, spec: EffectSpec, labels: list[str], sign: int, table,
                 nets: Effect | None = None, per_seed: Sequence[float] = ()) -> str:
    """The table's last line. `nets`: the networks-only CI, shown beside a verdict taken over seeds."""
    if len(labels) < 2:  # e.g. the E sweep under smoke, whose zoo has one snapshot
        return (f"verdict: unresolved — one cell ({labels[0] if labels else 'none'}): no effect to estimate "
                "under this budget, whose grid has a single value here.")
    expect = "positive" if sign > 0 else "negative"
    factor = f"{effect.detectable_factor:.1f}"
    mde = f"{effect.detectable:.2f} ({factor} x SE)" if effect.detectable == effect.detectable else "–"
    basis = (f"{effect.method} (per seed: {', '.join(signed(v) for v in per_seed)})" if nets is not None
             else f"{effect.method} over {effect.n} (seed, net) units")
    also = (f"; over the {nets.n} (seed, net) units alone, which leave out the distilled sets' noise: "
            f"{ci_text(nets)}" if nets is not None else "")
    if spec.kind == "log_slope":
        what = spec.what or "x"
        return (f"verdict: {word} — slope of test accuracy on ln({what}): {signed(effect.estimate)} points per unit "
                f"of ln {what} ({ci_text(effect)}; {basis} x {len(labels)} cells{also}); paper's sign: {expect}; "
                f"smallest slope this budget detects with 80% power: {mde}.")
    rows = "; ".join(f"{c}: {v} ({signed(d)}, {signed(lo)} to {signed(hi)})" for c, v, d, lo, hi in
                     table.drop_duplicates("cell")[["cell", "delta_verdict", "delta", "delta_ci95_low",
                                                    "delta_ci95_high"]].itertuples(index=False) if v)
    claim = f"; a positive difference means {spec.claim}" if spec.claim else f"; paper's sign: {expect}"
    per_row = f"; each row vs the previous: {rows}" if len(labels) > 2 else ""
    return (f"verdict: {word} — {labels[-1]} minus {labels[0]}: {signed(effect.estimate)} points "
            f"({ci_text(effect)}; {basis}{also}){claim}{per_row}; smallest "
            f"difference this budget detects with 80% power: {mde}.")
