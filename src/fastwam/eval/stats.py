"""Statistics for success rates: Wilson intervals, bootstrap intervals for differences, markdown tables.

Why Wilson and not the normal ("Wald") interval: evaluation cells are small (tens of episodes) and rates sit near 0 or
1, where Wald collapses to zero width (0/20 -> [0, 0]) or leaves [0, 1]. Wilson stays inside [0, 1] and keeps close to
nominal coverage at these sizes.

Why a bootstrap for differences: the ablation compares variants by their mean success over tasks (each task weighted
equally, as the paper averages per task), and that statistic has no simple closed-form interval. The bootstrap
resamples episodes within each (task, seed) cell, so the per-cell sample sizes and the task mix are kept.

Why a hierarchical bootstrap: separately trained models of one variant differ (seed-to-seed spreads of 5-12 points
were measured on Meta-World here), so an interval that resamples only evaluation episodes treats one training run's
luck as a property of the variant. `hierarchical_bootstrap` resamples training seeds, then episodes (paired on the
layouts every run shares), and reports each seed's number and the minimum detectable effect beside the interval.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

Z95 = 1.959963984540054  # two-sided 95 % standard normal quantile


# ---------------------------------------------------------------------------------------------------------------------
# Intervals


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes out of n trials (default 95 %).

    n = 0 carries no information: the interval is the whole [0, 1] (not NaN, so it stays valid JSON).
    """
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # The bounds are exactly 0 at k = 0 and exactly 1 at k = n; float round-off would give 1e-17 / 0.9999999999999999.
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


def rate_summary(k: int, n: int) -> dict:
    """{"successes", "episodes", "success_rate", "ci95": [lo, hi]} — the one shape used in results files."""
    lo, hi = wilson_interval(k, n)
    return {"successes": int(k), "episodes": int(n), "success_rate": (k / n) if n else 0.0, "ci95": [lo, hi]}


def _as_outcomes(cells: Sequence) -> list[np.ndarray]:
    """Each cell: a sequence of 0/1 outcomes, or a (successes, episodes) pair of ints."""
    out = []
    for cell in cells:
        if isinstance(cell, tuple) and len(cell) == 2 and all(isinstance(x, (int, np.integer)) for x in cell):
            k, n = int(cell[0]), int(cell[1])
            if not 0 <= k <= n:
                raise ValueError(f"a (successes, episodes) cell needs 0 <= k <= n, got {cell}")
            out.append(np.r_[np.ones(k), np.zeros(n - k)])
        else:
            arr = np.asarray(cell, dtype=float).ravel()
            if arr.size and not np.isin(arr, (0.0, 1.0)).all():
                raise ValueError("outcomes must be 0/1 (or booleans)")
            out.append(arr)
    if not out or any(a.size == 0 for a in out):
        raise ValueError("every cell needs at least one episode")
    return out


def _cells(x: Sequence | Mapping) -> tuple[list[str] | None, list]:
    if isinstance(x, Mapping):
        keys = list(x)
        return keys, [x[k] for k in keys]
    return None, list(x)


def bootstrap_diff_ci(
    a: Sequence | Mapping,
    b: Sequence | Mapping,
    *,
    paired: bool = False,
    n_boot: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """Percentile-bootstrap CI of mean_cells(rate_a) - mean_cells(rate_b).

    `a` and `b` are lists (or dicts keyed by cell name, matched by key) of cells; a cell is a 0/1 outcome sequence or
    a (successes, episodes) pair. The statistic is the unweighted mean of per-cell success rates (tasks count
    equally whatever their episode count).

    paired=False: the two arms are independent; episodes are resampled within each cell of each arm separately.
    paired=True: cell i of `a` and of `b` ran the same episodes (same env seeds / layouts), so episode j is resampled
    jointly in both arms — this removes the layout-difficulty variance the two arms share, giving a narrower,
    still valid interval. Needs outcome sequences of equal length per cell (counts lose the pairing).

    Returns {"diff", "ci95": [lo, hi], "p_boot"} where p_boot is the two-sided bootstrap tail fraction of the
    difference crossing zero (a rough indication, not an exact test).
    """
    ka, ca = _cells(a)
    kb, cb = _cells(b)
    if ka is not None and kb is not None:
        if set(ka) != set(kb):
            raise ValueError(f"a and b name different cells: {sorted(set(ka) ^ set(kb))}")
        cb = [b[k] for k in ka]  # type: ignore[index]
    if paired:
        for cell in (*ca, *cb):
            if isinstance(cell, tuple) and len(cell) == 2 and all(isinstance(x, (int, np.integer)) for x in cell):
                raise ValueError("paired=True needs per-episode outcome sequences, not (successes, episodes) counts")
    oa, ob = _as_outcomes(ca), _as_outcomes(cb)
    if paired and (len(oa) != len(ob) or any(x.size != y.size for x, y in zip(oa, ob))):
        raise ValueError("paired=True needs the same cells with the same number of episodes in a and b")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    observed = float(np.mean([x.mean() for x in oa]) - np.mean([y.mean() for y in ob]))

    def resampled_means(outcomes: list[np.ndarray], idx: list[np.ndarray] | None) -> np.ndarray:
        per_cell = []
        for i, x in enumerate(outcomes):
            j = idx[i] if idx is not None else rng.integers(0, x.size, size=(n_boot, x.size))
            per_cell.append(x[j].mean(axis=1))
        return np.mean(per_cell, axis=0)

    if paired:
        idx = [rng.integers(0, x.size, size=(n_boot, x.size)) for x in oa]
        diffs = resampled_means(oa, idx) - resampled_means(ob, idx)
    else:
        diffs = resampled_means(oa, None) - resampled_means(ob, None)
    alpha = 1 - confidence
    lo, hi = np.quantile(diffs, [alpha / 2, 1 - alpha / 2])
    p = 2 * min((diffs <= 0).mean(), (diffs >= 0).mean())
    return {"diff": observed, "ci95": [float(lo), float(hi)], "p_boot": float(min(1.0, p)), "n_boot": n_boot,
            "paired": paired}


# one entry per training seed: cell name -> per-episode outcomes (0/1 success, or a score in [0, 1])
Runs = Sequence[Mapping[str, Sequence[float]]]
Z80 = 0.8416212335729143  # one-sided 80 % quantile: power 0.8 for the minimum detectable effect


def _run_arrays(runs: Runs, cells: list[str], what: str) -> list[np.ndarray]:
    """Per cell: outcomes [n_seeds, n_episodes] (every training seed ran the same episodes of the cell)."""
    out = []
    for c in cells:
        rows = [np.asarray(r[c], dtype=float).ravel() for r in runs]
        if len({x.size for x in rows}) != 1 or rows[0].size == 0:
            raise ValueError(f"{what}: cell {c!r} has different (or no) episode counts across training seeds")
        values = np.concatenate(rows)
        if not (np.isfinite(values).all() and (values >= 0).all() and (values <= 1).all()):
            raise ValueError(f"{what}: outcomes must be in [0, 1] (0/1 success, or a per-episode score such as "
                             "progress)")
        out.append(np.stack(rows))
    return out


def hierarchical_bootstrap(
    a: Runs,
    b: Runs | None = None,
    *,
    n_boot: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
    resample_seeds: bool = True,
) -> dict:
    """Two-level percentile bootstrap of a success rate (b = None) or of a difference a - b, counting training seeds.

    `a` / `b`: one mapping per training seed (cell name, e.g. "task|eval_seed" -> per-episode outcome: 0/1 success,
    or any score in [0, 1], e.g. progress; the resampling does not assume Bernoulli outcomes). A run's
    success is the unweighted mean of its per-cell rates; a variant's is the mean over its training seeds. Each
    bootstrap replicate (1) resamples each arm's training seeds with replacement (the arms independently: they are
    separately trained models), then (2) resamples the episodes of every cell with replacement, with the SAME episode
    draw for every run of both arms, because every run was evaluated on the same layouts (paired: the layouts'
    difficulty, shared by all runs, cancels in a difference). With one seed per arm, or with seeds that behave
    identically, step (1) changes nothing and this is the paired episode bootstrap; with seeds that disagree the
    interval widens by the seed-to-seed spread, which episode-only intervals leave out. resample_seeds=False skips (1).

    Returns {"estimate", "ci95": [lo, hi], "se", "mde80", "p_boot", "per_seed_a" (, "per_seed_b"), "n_seeds"}:
    se is the bootstrap standard error; mde80 = (z_0.975 + z_0.8) * se, the smallest true difference this design
    detects with 80 % power at the 5 % level (for a single rate: the half-width scale of what can be resolved);
    p_boot the two-sided tail fraction crossing zero (for differences; a rough indication, not an exact test).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if not a or (b is not None and not b):
        raise ValueError("each arm needs at least one training seed")
    cells = sorted(set.intersection(*(set(r) for r in [*a, *(b or [])])))
    every = set.union(*(set(r) for r in [*a, *(b or [])]))
    if not cells or set(cells) != every:
        raise ValueError(f"every run must have the same cells; differing: {sorted(every - set(cells))[:6]}")
    xa = _run_arrays(a, cells, "a")
    xb = _run_arrays(b, cells, "b") if b is not None else None
    if xb is not None and any(x.shape[1] != y.shape[1] for x, y in zip(xa, xb)):
        raise ValueError("a and b ran different numbers of episodes in some cell: they cannot be paired")
    rng = np.random.default_rng(seed)
    # Step 2's shared episode draw, per cell: [n_boot, n_episodes]. Per-run means under it: [n_seeds, n_boot].
    idx = [rng.integers(0, x.shape[1], size=(n_boot, x.shape[1])) for x in xa]

    def run_means(xs: list[np.ndarray]) -> np.ndarray:
        return np.mean([x[:, j].mean(axis=2) for x, j in zip(xs, idx)], axis=0)

    def arm(xs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        per_seed = np.mean([x.mean(axis=1) for x in xs], axis=0)  # observed, [n_seeds]
        means = run_means(xs)  # [n_seeds, n_boot]
        n = means.shape[0]
        pick = rng.integers(0, n, size=(n_boot, n)) if resample_seeds else np.tile(np.arange(n), (n_boot, 1))
        return per_seed, means[pick, np.arange(n_boot)[:, None]].mean(axis=1)

    per_a, boot = arm(xa)
    estimate = float(per_a.mean())
    out: dict = {"per_seed_a": per_a.tolist(), "n_seeds": [len(a)]}
    if xb is not None:
        per_b, boot_b = arm(xb)
        boot = boot - boot_b
        estimate -= float(per_b.mean())
        out.update(per_seed_b=per_b.tolist(), n_seeds=[len(a), len(b)])
    alpha = 1 - confidence
    lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    se = float(boot.std(ddof=1))
    p = 2 * min((boot <= 0).mean(), (boot >= 0).mean())
    return {"estimate": estimate, "ci95": [float(lo), float(hi)], "se": se, "mde80": (Z95 + Z80) * se,
            "p_boot": float(min(1.0, p)), "n_boot": n_boot, "cells": len(cells), **out}


def percentile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 1]); NaN for an empty list is avoided by returning 0.0."""
    if not len(xs):
        return 0.0
    return float(np.quantile(np.asarray(xs, dtype=float), q))


# ---------------------------------------------------------------------------------------------------------------------
# Formatting


def fmt_rate(k: int, n: int, digits: int = 1) -> str:
    """'84.0 [71.6, 91.7] (42/50)' — success rate and Wilson 95 % CI in percent."""
    lo, hi = wilson_interval(k, n)
    rate = 100 * k / n if n else 0.0
    return f"{rate:.{digits}f} [{100 * lo:.{digits}f}, {100 * hi:.{digits}f}] ({k}/{n})"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured markdown table. align: per column 'l' | 'r' | 'c' (default: first left, others right)."""
    if any(len(r) != len(headers) for r in rows):
        raise ValueError("every row needs one value per header")
    align = list(align) if align is not None else ["l"] + ["r"] * (len(headers) - 1)
    marks = {"l": ":---", "r": "---:", "c": ":---:"}
    esc = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731 - a pipe would split the cell
    lines = ["| " + " | ".join(esc(h) for h in headers) + " |", "|" + "|".join(marks[a] for a in align) + "|"]
    lines += ["| " + " | ".join(esc(v) for v in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def success_table(cells: Mapping[str, Mapping[str, tuple[int, int]]], row_title: str = "task",
                  mean_row: bool = True) -> str:
    """Rows x columns of (successes, episodes) -> markdown with rate and Wilson CI per cell.

    e.g. cells = {"drawer-open-v3": {"fast": (45, 50), "joint": (47, 50)}, ...}. The optional mean row is the
    unweighted mean of per-row rates with a pooled-episode Wilson CI (labelled as such: tasks differ in difficulty, so
    use `bootstrap_diff_ci` for comparisons between columns).
    """
    columns: list[str] = []
    for row in cells.values():
        for c in row:
            if c not in columns:
                columns.append(c)
    rows = []
    for name, row in cells.items():
        rows.append([name] + [fmt_rate(*row[c]) if c in row else "-" for c in columns])
    if mean_row and len(cells) > 1:
        mean = ["mean over rows (pooled CI)"]
        for c in columns:
            present = [row[c] for row in cells.values() if c in row]
            rate = 100 * float(np.mean([k / n if n else 0.0 for k, n in present]))
            k, n = sum(k for k, _ in present), sum(n for _, n in present)
            lo, hi = wilson_interval(k, n)
            mean.append(f"{rate:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] ({k}/{n})")
        rows.append(mean)
    return markdown_table([row_title, *columns], rows)
