"""The report of the real-time study (`fastwam ablate --axes 'steps=...;async=...' --distill-steps N`): what fewer
denoising steps (plain or distilled) and asynchronous execution (naive switching vs real-time chunking) cost in
success, and what they buy in latency and smoothness.

Every number comes from the study's files: OUT/eval/CELL/MODEL_sSEED[/CONDITION]/results.json (success per episode,
and the executed actions' jumps at chunk seams and within chunks), OUT/latency_CELL.json (`fastwam bench latency
--step-counts ... --rtc`, timed alone on an idle core). Intervals are the hierarchical bootstrap of `sweep_report`
(training seeds, then episodes paired on the shared layouts); verdicts are computed from them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from fastwam.eval.stats import markdown_table
from fastwam.study.sweep_report import (
    BASE,
    MIN_SEEDS,
    _arm,
    _cell_params,
    _ci,
    _compare,
    _label,
    _seeds,
    command_and_budget,
    conditions_section,
    load,
    status_section,
)


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def is_realtime_study(args: Any) -> bool:
    from fastwam.study.plan import parse_axes

    axes = parse_axes(getattr(args, "axes", "") or "")
    return (bool(getattr(args, "distill_steps", "")) or bool(getattr(args, "prefix_tune", 0))
            or any(n in ("steps", "async") for n, _ in axes))


def _models(runs: dict, cell: str) -> list[str]:
    """The cell's fast models: the trained one, its distilled samplers by step count, then its prefix-tuned one."""
    found = {i["variant"] for i in runs.values() if i.get("cell") == cell and str(i["variant"]).startswith("fast")}
    return sorted(found, key=lambda v: (v != "fast", v.startswith("fast_p"), int(v[6:]) if v != "fast" else 0))


def _is_prefix(model: str) -> bool:
    return model.startswith("fast_p")


def _model_label(model: str, steps: int | None = None) -> str:
    if model == "fast":
        n = steps if steps is not None else 10
        return f"plain, {n} step{'s' if n != 1 else ''}"
    if _is_prefix(model):
        return f"prefix-tuned (N = {model[6:]}), 10 steps"
    return f"distilled, {model[6:]} step{'s' if model[6:] != '1' else ''}"


def _steps_of(model: str, cond: str) -> int:
    if _is_prefix(model):
        return 10
    if model.startswith("fast_d"):
        return int(model[6:])
    return int(cond[5:]) if cond.startswith("steps") else 10


def _verdict(r: dict | None) -> str:
    if r is None:
        return "-"
    lo, hi = r["ci95"]
    provisional = f" (provisional: < {MIN_SEEDS} seeds)" if min(r["n_seeds"]) < MIN_SEEDS else ""
    if lo > 0:
        return "better" + provisional
    if hi < 0:
        return "worse" + provisional
    within = abs(r["estimate"]) <= r["mde80"]
    return ("no difference detected (within the MDE)" if within else "unresolved") + provisional


def _smoothness(table: dict, cell: str, model: str, cond: str) -> tuple[float | None, float | None]:
    """Mean over training seeds of the seam and within-chunk jumps of the executed actions."""
    seam, within = [], []
    for results in table.get((cell, model, cond), {}).values():
        sm = next(iter(results["summary"].values()), {}).get("smoothness") or {}
        if sm.get("seam_jump") is not None:
            seam.append(sm["seam_jump"])
        if sm.get("within_chunk_jump") is not None:
            within.append(sm["within_chunk_jump"])
    return (float(np.mean(seam)) if seam else None), (float(np.mean(within)) if within else None)


def steps_section(out: Path, runs: dict, table: dict, cells: list[str], conds: list[str]) -> tuple[list[str], list]:
    rows, points = [], []
    for cell in cells:
        lat = (_cell_params(out, cell) if cell else _json(out / "latency.json")).get("step_counts", {})
        ref = _arm(table, cell, "fast", BASE)
        ref_ms = lat.get("10", {}).get("fast", {}).get("p50_ms")
        for model in [m for m in _models(runs, cell) if not _is_prefix(m)]:  # those in their own section
            for cond in [BASE] + [c for c in conds if c.startswith("steps")]:
                if model != "fast" and cond != BASE:
                    continue
                arm = _arm(table, cell, model, cond)
                if not arm:
                    continue
                n = _steps_of(model, cond)
                rate = _compare(arm)
                diff = None if (model == "fast" and cond == BASE) else _compare(arm, ref)
                ms = lat.get(str(n), {}).get("fast", {}).get("p50_ms")
                rows.append([cell, _model_label(model, n), str(n), _ci(rate, signed=False), _seeds(rate),
                             _ci(diff) if diff else "(reference)", f"{100 * diff['mde80']:.1f}" if diff else "-",
                             _verdict(diff) if diff else "-", f"{ms:.1f}" if ms else "-",
                             f"{ref_ms / ms:.1f}x" if ms and ref_ms else "-"])
                points.append((cell, model, n, rate, ms))
    if not rows:
        return [], points
    return ["## Few-step sampling: success and latency", "",
            "Success (mean over training seeds, hierarchical 95 % interval) of the same trained fast models "
            "sampled with fewer Euler steps, and of their distilled few-step samplers (`fastwam distill`); the "
            "difference is against the plain 10-step sampler, paired on the same layouts. Latency: batch-1 "
            "observation -> chunk p50 of the fast path at that step count (`fastwam bench latency --step-counts`, "
            "this study's architecture, one core, timed alone); the action expert runs once per step, so its FLOPs "
            "per chunk scale with the step count.", "",
            markdown_table(["cell", "sampler", "steps", "success", "per seed", "vs plain 10 steps, points", "MDE",
                            "verdict", "fast p50 ms", "speed-up"], rows), ""], points


def async_section(runs: dict, table: dict, cells: list[str], conds: list[str], facts: list | None = None
                  ) -> list[str]:
    rows = []
    for cell in cells:
        for model in _models(runs, cell):
            sync = _arm(table, cell, model, BASE)
            base_seam, base_within = _smoothness(table, cell, model, BASE)
            before = len(rows)
            for cond in [c for c in conds if c.startswith("async_")]:
                arm = _arm(table, cell, model, cond)
                if not arm:
                    continue
                diff = _compare(arm, sync)
                seam, within = _smoothness(table, cell, model, cond)
                if facts is not None:
                    facts.append((cell, model, cond, diff, seam, within))
                ratio = f"{seam / within:.2f}" if seam is not None and within else "-"
                rows.append([cell, _model_label(model), _label(cond), _ci(_compare(arm), signed=False), _seeds(diff),
                             _ci(diff), f"{100 * diff['mde80']:.1f}" if diff else "-", _verdict(diff),
                             f"{seam:.3f}" if seam is not None else "-", f"{within:.3f}" if within else "-", ratio])
            if len(rows) > before and base_seam is not None:
                rows.append([cell, _model_label(model), "synchronous (base)", _ci(_compare(sync), signed=False),
                             "", "(reference)", "-", "-", f"{base_seam:.3f}",
                             f"{base_within:.3f}" if base_within else "-",
                             f"{base_seam / base_within:.2f}" if base_within else "-"])
    if not rows:
        return []
    return ["## Asynchronous execution: naive switching vs real-time chunking", "",
            "The robot keeps executing the previous chunk for the inference delay (in control steps) while the next "
            "chunk is computed; naive switches to the new chunk at once, rtc samples it to continue the old one "
            "(first actions pinned, overlap guided). Differences are against the same model run synchronously (the "
            "robot waits; the base condition), paired on the same layouts. Smoothness: the executed actions' mean L2 "
            "jump at chunk seams and within chunks (mean over training seeds); seam / within near 1 means the chunks "
            "join as smoothly as they run.", "",
            markdown_table(["cell", "sampler", "condition", "success", "per seed", "vs synchronous, points", "MDE",
                            "verdict", "seam jump", "within-chunk jump", "seam / within"], rows), ""]


def prefix_section(runs: dict, table: dict, cells: list[str], conds: list[str]) -> list[str]:
    """Training-time action conditioning against RTC's guidance: the prefix-tuned model and the model it was tuned
    from, in the same conditions on the same layouts (the difference is paired)."""
    rows = []
    for cell in cells:
        for model in [m for m in _models(runs, cell) if _is_prefix(m)]:
            for cond in [c for c in conds if c.startswith("async_rtc")] + [BASE]:
                tuned, guided = _arm(table, cell, model, cond), _arm(table, cell, "fast", cond)
                if not tuned or not guided:
                    continue
                diff = _compare(tuned, guided)
                jumps = [_smoothness(table, cell, m, cond) for m in ("fast", model)]
                ratios = [f"{seam / within:.2f}" if seam is not None and within else "-" for seam, within in jumps]
                rows.append([cell, f"N = {model[6:]}", "synchronous" if cond == BASE else _label(cond),
                             _ci(_compare(guided), signed=False), _ci(_compare(tuned), signed=False), _seeds(diff),
                             _ci(diff), f"{100 * diff['mde80']:.1f}" if diff else "-", _verdict(diff), *ratios])
    if not rows:
        return []
    return ["## Real-time chunking: training-time conditioning vs guidance", "",
            "The same trained fast models, and each fine-tuned to continue a committed action prefix "
            "(`train.action_prefix_max` = N: a random prefix of at most N actions is given clean at timestep 0 and "
            "left out of the loss; Black, Ren, Equi and Levine 2025). With asynchronous rtc the original model is "
            "guided towards the previous chunk (a vector-Jacobian product per step); the tuned one is handed the "
            "prefix and sampled plainly. Synchronous: no prefix to continue, which the tuned model rarely saw in "
            "training. Differences: tuned - original, paired on the same layouts.", "",
            markdown_table(["cell", "prefix", "condition", "original", "prefix-tuned", "per seed, tuned",
                            "tuned - original, points", "MDE", "verdict", "seam / within, original",
                            "seam / within, tuned"], rows), ""]


def targets_section(table: dict, points: list, facts: list) -> list[str]:
    """The issue's targets, checked against the tables above (computed, never written by hand)."""
    lines = []
    ref_ms = {cell: ms for cell, model, n, _, ms in points if model == "fast" and n == 10}
    for cell, model, n, _, ms in points:
        if n > 2 or not ms or not ref_ms.get(cell):
            continue
        diff = _compare(_arm(table, cell, model, BASE if model != "fast" else f"steps{n}"),
                        _arm(table, cell, "fast", BASE))
        if diff is None:
            continue
        speed = ref_ms[cell] / ms
        holds = diff["ci95"][0] >= -diff["mde80"] and speed >= 3
        lines.append(f"- {cell}, {_model_label(model, n)}: {_ci(diff)} points vs plain 10 steps (MDE "
                     f"{100 * diff['mde80']:.1f}) at {speed:.1f}x lower latency and {10 // n}x fewer action-expert "
                     f"calls: the target (success within the MDE, >= 3x faster) {'holds' if holds else 'does not hold'}"
                     + (" (latency short of 3x)" if speed < 3 else "") + ".")
    by = {(cell, model, cond): (diff, seam, within) for cell, model, cond, diff, seam, within in facts}
    for (cell, model, cond), (diff, seam, within) in sorted(by.items()):
        if not cond.startswith("async_rtc") or diff is None:
            continue
        d = cond[len("async_rtc"):]
        naive = by.get((cell, model, f"async_naive{d}"))
        text = (f"- {cell}, {_model_label(model)}, delay {d}: rtc {_ci(diff)} points vs synchronous (loses at most 2 "
                f"points: {'yes' if diff['estimate'] >= -0.02 else 'no'})")
        if naive is not None and naive[0] is not None:
            worse = naive[0]["estimate"] < diff["estimate"]
            text += f"; naive {_ci(naive[0])} (below rtc: {'yes' if worse else 'no'})"
            if seam is not None and within and naive[1] is not None and naive[2]:
                closer = seam / within < naive[1] / naive[2]
                text += (f"; seam / within-chunk jump {seam / within:.2f} vs naive's {naive[1] / naive[2]:.2f} "
                         f"(closer to 1: {'yes' if closer else 'no'})")
        lines.append(text + ".")
    if not lines:
        return []
    return ["## Against the targets", "",
            "Targets: a one- or two-step sampler within its MDE of the 10-step model at >= 3x lower latency; RTC at "
            "delay 4 within 2 points of synchronous execution while naive switching does worse, with seam jumps "
            "closer to within-chunk jumps than naive's (point estimates; the intervals are in the tables). Verdicts "
            "with fewer than 3 training seeds are provisional.",
            "", *lines, ""]


def _plot(out: Path, points: list) -> Path | None:
    pts = [p for p in points if p[3] is not None and p[4]]
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, marker in (("plain", "o"), ("distilled", "s")):
        sel = [p for p in pts if (p[1] == "fast") == (kind == "plain")]
        if not sel:
            continue
        ms = [p[4] for p in sel]
        est = [100 * p[3]["estimate"] for p in sel]
        err = [[100 * (p[3]["estimate"] - p[3]["ci95"][0]) for p in sel],
               [100 * (p[3]["ci95"][1] - p[3]["estimate"]) for p in sel]]
        ax.errorbar(ms, est, yerr=err, fmt=marker, capsize=3, label=kind)
        for p, x, y in zip(sel, ms, est):
            ax.annotate(f"{p[0]} N={p[2]}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("fast path p50 latency, ms (batch 1, one CPU core)")
    ax.set_ylabel("success, %")
    ax.set_title("Few-step sampling: success against latency")
    ax.legend()
    fig.tight_layout()
    path = out / "realtime_steps.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_async(out: Path, table: dict, facts: list) -> Path | None:
    """Success against synchronous execution, and the seam / within-chunk jump ratio, over the inference delay:
    one column per sampler, naive and rtc in colour, cells in line style; synchronous execution is the reference."""
    pts = [f for f in facts if f[3] is not None]
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(model for _, model, _, _, _, _ in pts))
    cells = list(dict.fromkeys(cell for cell, _, _, _, _, _ in pts))
    fig, axes = plt.subplots(2, len(models), figsize=(4.2 * len(models), 6.4), squeeze=False, sharey="row")
    styles = ["-", "--", ":", "-."]
    for col, model in enumerate(models):
        top, bottom = axes[0][col], axes[1][col]
        top.axhline(0, color="grey", lw=0.8)
        for ci, cell in enumerate(cells):
            ls = styles[ci % len(styles)]
            base_seam, base_within = _smoothness(table, cell, model, BASE)
            if base_seam is not None and base_within:
                bottom.axhline(base_seam / base_within, color="grey", ls=ls, lw=0.8)
            for chunking, colour in (("naive", "tab:orange"), ("rtc", "tab:blue")):
                sel = sorted((int(cond[len(f"async_{chunking}"):]), diff, seam, within)
                             for cell_, model_, cond, diff, seam, within in pts
                             if cell_ == cell and model_ == model and cond.startswith(f"async_{chunking}"))
                if not sel:
                    continue
                ds = [d for d, _, _, _ in sel]
                est = [100 * r["estimate"] for _, r, _, _ in sel]
                err = [[100 * (r["estimate"] - r["ci95"][0]) for _, r, _, _ in sel],
                       [100 * (r["ci95"][1] - r["estimate"]) for _, r, _, _ in sel]]
                shift = (ci - (len(cells) - 1) / 2) * 0.08 + (0.04 if chunking == "rtc" else -0.04)
                top.errorbar([d * (1 + shift) for d in ds], est, yerr=err, color=colour, ls=ls, marker="o",
                             ms=3, capsize=2, label=f"{chunking}, {cell}")
                ratio = [(d, seam / within) for d, _, seam, within in sel if seam is not None and within]
                if ratio:
                    bottom.plot(*zip(*ratio), color=colour, ls=ls, marker="o", ms=3)
        top.set_title(_model_label(model))
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({int(c[len("async_naive"):]) if c.startswith("async_naive")
                                  else int(c[len("async_rtc"):]) for _, m, c, _, _, _ in pts if m == model}))
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        bottom.set_xlabel("inference delay, control steps")
    axes[0][0].set_ylabel("success vs synchronous, points")
    axes[1][0].set_ylabel("seam / within-chunk jump\n(grey: synchronous)")
    axes[0][0].legend(fontsize=7)  # the first column has every line (later ones may lack naive)
    fig.suptitle("Asynchronous execution: naive switching vs real-time chunking")
    fig.tight_layout()
    path = out / "realtime_async.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_realtime_report(out: Path, runs: dict, args: Any, conds: list[str]) -> Path:
    out = Path(out)
    table = load(runs)
    cells = list(dict.fromkeys(i["cell"] for i in runs.values() if i.get("cell") is not None))
    cell_specs = _json(out / "cells.json")
    lines = ["# Acting in real time: few-step sampling and asynchronous execution", ""]
    source = getattr(args, "models_from", "")
    if source:
        lines += [f"The trained models are those of the study in `{source}` (evaluated and distilled here, not "
                  "retrained).", ""]
    lines += command_and_budget(out, {c: cell_specs.get(c, {}) for c in cells},
                                lambda a: f"{a['train_steps']} training steps per model, "
                                          f"{a.get('distill_train_steps', 500)} per distillation"
                                          + (f", {a['prefix_train_steps']} per prefix fine-tune (peak lr "
                                             f"{a['prefix_lr']:g})" if a.get("prefix_tune") else ""))
    lines += status_section(table, runs) + conditions_section(conds)
    step_lines, points = steps_section(out, runs, table, cells, conds)
    facts: list = []
    lines += step_lines + async_section(runs, table, cells, conds, facts) + prefix_section(runs, table, cells, conds)
    lines += targets_section(table, points, facts)
    path = _plot(out, points)
    if path is not None:
        lines += [f"![success against latency]({path.name})", ""]
    path = _plot_async(out, table, facts)
    if path is not None:
        lines += [f"![success and seam smoothness against the inference delay]({path.name})", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
