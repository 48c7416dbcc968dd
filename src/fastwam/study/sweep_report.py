"""The report of a sweep study (`fastwam ablate --cells ... --axes ...`): the co-training effect against the video
expert's capacity, and the imagination map (joint - fast and idm - fast along evaluation axes), every interval from
the hierarchical bootstrap (training seeds, then episodes paired on the shared layouts), with per-seed numbers and
the minimum detectable effect beside it. Everything is computed from the study's own files; the verdicts are
derived from the intervals, never written by hand.

Reads OUT/cells.json, OUT/config_CELL.json, OUT/latency_CELL.json, OUT/eval/CELL/VARIANT_sSEED[/CONDITION]/results.json
and OUT/runs/CELL/VARIANT_sSEED/metrics.jsonl; writes OUT/report.md, capacity.png, imagination_map.png and
imagined_vs_real.png.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from fastwam.eval.metaworld_results import load_results
from fastwam.eval.stats import hierarchical_bootstrap, markdown_table

BASE = "base"
# Meta-World MT10 by task structure. Multi-stage: the object is acquired (grasped or contacted) and then carried or
# pushed to a separate goal, so the motion late in a chunk heads somewhere the first frame's most salient object does
# not mark (the scripted experts have >= 3 waypoint phases and a final target apart from the object). Single-stage:
# one target, reached directly or by moving an articulated part along its constraint (reach, button, drawer, window,
# door: the experts' phases only approach and then push/pull the same part).
MULTI_STAGE = ("pick-place-v3", "push-v3", "peg-insert-side-v3")
N_BOOT = 5000
MIN_SEEDS = 3  # training seeds a comparison needs before its verdict stops being provisional


# ---------------------------------------------------------------------------------------------------------------------
# Loading


def _outcomes(results: dict, tasks: tuple[str, ...] | None = None, metric: str = "success") -> dict[str, list]:
    """(task|eval seed) -> per-episode outcomes of one evaluation (optionally only some tasks): 0/1 success, or
    (metric "progress") the episode's highest shaped reward / 10, Meta-World's rewards being 0-10 progress signals."""
    def values(c: dict) -> list:
        return [x / 10.0 for x in c["episode_max_reward"]] if metric == "progress" else list(c["episode_success"])

    return {f"{c['task']}|{c['seed']}": values(c) for c in results["cells"] if tasks is None or c["task"] in tasks}


def _has_progress(results: dict) -> bool:
    """Evaluations before 2026-12-01 recorded success only."""
    return all("episode_max_reward" in c for c in results["cells"])


def load(runs: dict) -> dict[tuple[str, str, str], dict[int, dict]]:
    """(cell, variant, condition) -> {training seed: results.json} for every evaluation on disk."""
    table: dict[tuple[str, str, str], dict[int, dict]] = {}
    for info in runs.values():
        if info.get("cell") is None:
            continue
        for cond, eval_dir in info.get("evals", {}).items():
            path = Path(eval_dir) / "results.json"
            results = load_results(path.parent) if path.is_file() else {"partial": True}
            if not results.get("partial"):  # an evaluation stopped by Ctrl-C is not a result until it is rerun
                table.setdefault((info["cell"], info["variant"], cond), {})[info["seed"]] = results
    return table


def _arm(table, cell: str, variant: str, cond: str, tasks=None, metric: str = "success") -> dict[int, dict]:
    results = sorted(table.get((cell, variant, cond), {}).items())
    return {s: _outcomes(r, tasks, metric) for s, r in results if metric != "progress" or _has_progress(r)}


def _compare(a: dict[int, dict], b: dict[int, dict] | None = None) -> dict | None:
    """A success rate (b None) or the difference a - b over the training seeds both arms have (a later seed that one
    arm has and the other not yet waits: a balanced design, and no comparison vanishes mid-study)."""
    if b is not None:
        common = set(a) & set(b)
        a, b = {s: a[s] for s in sorted(common)}, {s: b[s] for s in sorted(common)}
    if not a or (b is not None and not b):
        return None
    return hierarchical_bootstrap(list(a.values()), None if b is None else list(b.values()), n_boot=N_BOOT)


def _video_loss(run_dir: Path, last: int = 5) -> float | None:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    vals = [r["video"] for r in rows if "video" in r and "val" not in r][-last:]
    return float(np.mean(vals)) if vals else None


def _cell_params(out: Path, cell: str) -> dict:
    """The cell's latency / parameter counts (`fastwam bench latency`), timed once per architecture: a cell that
    differs from another only in its data or initialisation reads that cell's file."""
    from fastwam.study.plan import model_overrides

    cells = json.loads((out / "cells.json").read_text()) if (out / "cells.json").is_file() else {}
    same = [cell] + [c for c in cells if c != cell and cell in cells
                     and model_overrides(cells[c]) == model_overrides(cells[cell])]
    for c in same:
        p = out / f"latency_{c}.json"
        if p.is_file():
            return json.loads(p.read_text())
    return {}


# ---------------------------------------------------------------------------------------------------------------------
# Formatting


def _pts(x: float) -> str:
    return f"{round(100 * x, 1) + 0.0:+.1f}"  # + 0.0: a bound of -0.04 points prints as +0.0, not -0.0


def _ci(r: dict | None, signed: bool = True) -> str:
    if r is None:
        return "-"
    f = _pts if signed else (lambda x: f"{100 * x:.1f}")
    return f"{f(r['estimate'])} [{f(r['ci95'][0])}, {f(r['ci95'][1])}]"


def _seeds(r: dict | None, key: str = "per_seed_a") -> str:
    return "-" if r is None else " / ".join(f"{100 * x:.0f}" for x in r[key])


def _seed_counts(results) -> list[int]:
    """The distinct numbers of training seeds the given comparisons rest on (None entries skipped)."""
    return sorted({min(r["n_seeds"]) for r in results if r is not None})


def _sign(r: dict | None) -> str:
    if r is None:
        return "not measured"
    lo, hi = r["ci95"]
    verdict = "pays" if lo > 0 else "hurts" if hi < 0 else "unresolved"
    seeds = min(r["n_seeds"])
    if seeds < MIN_SEEDS:
        # With one training seed the bootstrap can only resample episodes: the interval leaves out the seed-to-seed
        # spread, which in this project's earlier studies was as large as the effects themselves.
        verdict += f" (provisional: {seeds} training seed{'s' if seeds > 1 else ''})"
    return verdict


# ---------------------------------------------------------------------------------------------------------------------
# Sections


def capacity_section(out: Path, runs: dict, table: dict, cells: dict[str, dict]) -> tuple[list[str], list[dict]]:
    rows, points = [], []
    for cell in cells:
        fast, none = _arm(table, cell, "fast", BASE), _arm(table, cell, "no_cotrain", BASE)
        if not fast and not none:
            continue
        co = _compare(fast, none)
        params = _cell_params(out, cell).get("params", {})
        losses = [_video_loss(i["run_dir"]) for i in runs.values()
                  if i.get("cell") == cell and i["variant"] == "fast"]
        losses = [x for x in losses if x is not None]
        point = {"cell": cell, "video_params": params.get("video_expert"), "action_params": params.get("action_expert"),
                 "fast": _compare(fast), "no_cotrain": _compare(none), "cotrain": co,
                 "video_loss": float(np.mean(losses)) if losses else None}
        points.append(point)
        size = lambda key: f"{params.get(key, 0) / 1e6:.2f}M"  # noqa: E731
        rows.append([cell, size("video_expert"), size("action_expert"),
                     f"{point['video_loss']:.3f}" if point["video_loss"] is not None else "-",
                     _ci(point["fast"], signed=False), _seeds(point["fast"]),
                     _ci(point["no_cotrain"], signed=False), _seeds(point["no_cotrain"]),
                     _ci(co), f"{100 * co['mde80']:.1f}" if co else "-", _sign(co)])
    if not rows:
        return [], points
    lines = ["## Co-training against the video expert's capacity", "",
             "Success in % (mean over training seeds of the mean per-task success) with hierarchical 95 % intervals "
             "(training seeds, then episodes paired on the shared layouts); per-seed numbers beside them; MDE = the "
             "smallest true effect this design detects with 80 % power. The action expert is the same in every "
             "cell (the video expert grows by its own hidden size `video_hidden_dim` at a fixed shared attention "
             "width), so the cells differ only in the video expert.", "",
             markdown_table(["cell", "video expert", "action expert", "final video loss (fast)", "fast", "per seed",
                             "no_cotrain", "per seed", "co-training (fast - no_cotrain), points", "MDE", "verdict"],
                            rows), ""]
    return lines, points


def cotrain_conditions_section(table: dict, cells: dict[str, dict], conds: list[str],
                               where: str = "in the capacity table") -> list[str]:
    """Co-training (fast - no_cotrain) under every evaluation condition both variants were evaluated in: whether
    the video loss buys robustness (to shifts, open-loop length, stale frames) beyond the base condition."""
    rows = []
    for cell in cells:
        for cond in conds:
            if cond == BASE:
                continue
            fast, none = _arm(table, cell, "fast", cond), _arm(table, cell, "no_cotrain", cond)
            co = _compare(fast, none)
            if co is None:
                continue
            rows.append([cell, _label(cond), _ci(_compare(fast), signed=False), _ci(_compare(none), signed=False),
                         _ci(co), f"{100 * co['mde80']:.1f}", _sign(co)])
    if not rows:
        return []
    return ["## Co-training under each evaluation condition", "",
            f"The same fast and no_cotrain models as {where}, evaluated under the conditions below: "
            "does training with the video loss make the policy more robust, not only better on the training "
            "distribution?", "",
            markdown_table(["cell", "condition", "fast", "no_cotrain", "co-training (fast - no_cotrain), points",
                            "MDE", "verdict"], rows), ""]


def imagination_section(out: Path, table: dict, cells: dict[str, dict], conds: list[str]) -> tuple[list[str], list]:
    lines, rows, forest = [], [], []
    for cell in cells:
        present = [c for c in conds if _arm(table, cell, "fast", c) and
                   (_arm(table, cell, "joint", c) or _arm(table, cell, "idm", c))]
        if not present:
            continue
        lat = _cell_params(out, cell).get("modes", {})
        fast_ms = lat.get("fast", {}).get("p50_ms")
        for cond in present:
            fast = _arm(table, cell, "fast", cond)
            effects = {}
            for v in ("joint", "idm"):
                other = _arm(table, cell, v, cond)
                effects[v] = _compare(other, fast)
            row = [cell, _label(cond), _ci(_compare(fast), signed=False)]
            for v in ("joint", "idm"):
                r = effects[v]
                ms = lat.get(v, {}).get("p50_ms")
                cost = f"{ms / fast_ms:.1f}x" if ms and fast_ms else "-"
                row += [_ci(r), _seeds(r, "per_seed_a"), f"{100 * r['mde80']:.1f}" if r else "-", cost]
            rows.append(row)
            forest.append((cell, cond, effects))
    if rows:
        lines += ["## The imagination map: where does imagining the future pay?", "",
                  "Each row is one evaluation condition of the same trained models (evaluation only). Effects in "
                  "points, imagination variant minus fast, hierarchical 95 % intervals; per-seed success of the "
                  "imagination variant; MDE at 80 % power; the latency paid is batch-1 observation -> chunk time "
                  "relative to fast (`fastwam bench latency`, this study's architecture).", "",
                  markdown_table(["cell", "condition", "fast success", "joint - fast", "joint per seed", "MDE",
                                  "latency", "idm - fast", "idm per seed", "MDE", "latency"], rows), ""]
    return lines, forest


def task_structure_section(table: dict, cells: dict[str, dict], conds: list[str]) -> list[str]:
    rows, floor = [], []
    for cell in cells:
        for cond in conds:
            fast_all = _arm(table, cell, "fast", cond)
            if not fast_all:
                continue
            tasks = {k.split("|")[0] for outcomes in fast_all.values() for k in outcomes}
            multi = tuple(t for t in tasks if t in MULTI_STAGE)
            single = tuple(t for t in tasks if t not in MULTI_STAGE)
            for name, subset in (("multi-stage", multi), ("single-stage", single)):
                if not subset:
                    continue
                row = [cell, _label(cond), f"{name} ({len(subset)} tasks)"]
                # success, then progress: the same comparison on the episode's highest shaped reward (/ 10), which
                # still moves where success sits at 0 (evaluations that recorded it only)
                for metric in ("success", "progress"):
                    arms = {v: _arm(table, cell, v, cond, subset, metric) for v in ("fast", "joint", "idm")}
                    row.append(_ci(_compare(arms["fast"]), signed=False))
                    row += [_ci(_compare(arms[v], arms["fast"])) for v in ("joint", "idm")]
                    if metric == "success" and not any(x for arm in arms.values() for outcomes in arm.values()
                                                       for ep in outcomes.values() for x in ep):
                        floor.append(f"{cell} {name}")
                rows.append(row)
    if not rows:
        return []
    note = ([f"At the floor (no episode succeeded with any variant: {', '.join(floor)}): there the split cannot "
             "show whether imagination helps, only that none of these policies solves those tasks (progress, where "
             "recorded, still compares how far they get).", ""]
            if floor else [])
    return ["## Task structure", "",
            f"Multi-stage tasks: {', '.join(t.replace('-v3', '') for t in MULTI_STAGE)} (an object is acquired, then "
            "carried or pushed to a separate goal: the end of a chunk heads somewhere the first frame's most salient "
            "object does not mark); single-stage: the other MT10 tasks (one target, reached directly or by moving an "
            "articulated part along its constraint). Same models and episodes as above, split by task. Progress: "
            "the episode's highest shaped reward in % of Meta-World's 0-10 scale (reaching, grasping, carrying "
            "each raise it), which tells apart policies that all fail.", "",
            markdown_table(["cell", "condition", "tasks", "fast success", "joint - fast", "idm - fast",
                            "fast progress", "joint - fast (progress)", "idm - fast (progress)"], rows),
            "", *note]


# What each evaluation condition changes and why it may make the current frame a poor anchor for the chunk.
CONDITION_TEXT = {
    "replan": "re-plan every {v} actions instead of 8: the chunk runs open loop for {v} steps, so the further it "
              "reaches the more it depends on where the robot will be rather than where it is",
    "shift_camera": "the scene camera moved (azimuth +12 deg, elevation -7 deg, 6 cm further); trained on unshifted "
                    "demonstrations",
    "shift_lighting": "dimmer, warm lighting; trained on unshifted demonstrations",
    "shift_colour": "a different table, floor and wall, and task objects with their colour channels rotated; trained "
                    "on unshifted demonstrations",
    "delay": "observation delay of {v} steps (designed for this study): from the second chunk on, the policy sees the "
             "frame taken {v} steps before re-planning time and executes the part of its chunk that plans for now "
             "(latency compensation, as with a slow camera). The observation undersells what comes next: the robot "
             "has moved on since the frame was taken, and a model that predicts how the scene evolves should place "
             "its later actions better than one that anchors on the stale frame",
    "steps": "{v} denoising step(s) per chunk instead of the checkpoint's 10 (the fast path's cost is the step count "
             "times the action expert)",
    "async_sync": "asynchronous execution, synchronous rule: the robot waits while a chunk is computed ({v} control "
                  "steps of inference delay cost no motion), today's behaviour",
    "async_naive": "asynchronous execution: the previous chunk keeps executing for the {v} control steps a chunk takes "
                   "to compute, then the robot switches to the new chunk at once (from its index {v})",
    "async_rtc": "asynchronous execution with real-time chunking: as naive, but the new chunk is sampled to continue "
                 "the old one (its first {v} actions pinned to those that ran, the overlap guided)",
}


def _condition_text(cond: str) -> str:
    for key, text in CONDITION_TEXT.items():
        if cond.startswith(key):
            value = cond[len(key):]
            if key in ("replan", "delay", "steps", "async_sync", "async_naive", "async_rtc") and not value.isdigit():
                continue
            return text.format(v=value)
    return ""


def conditions_section(conds: list[str]) -> list[str]:
    rows = [f"- **{_label(c)}**: {text}." for c in conds if c != BASE and (text := _condition_text(c))]
    if not rows:
        return []
    return ["## Evaluation conditions", "",
            "Every condition evaluates the same trained models on the same layouts (evaluation seeds and episodes); "
            "the base condition re-plans every 8 actions with unshifted, current observations.", ""] + rows + [""]


def _label(cond: str) -> str:
    if cond.startswith("async_") and cond.rstrip("0123456789") != cond:
        rule = cond[6:].rstrip("0123456789")
        return f"async {rule}, delay {cond[6 + len(rule):]}"
    if cond.startswith("steps") and cond[5:].isdigit():
        return f"{cond[5:]} denoising step{'s' if cond[5:] != '1' else ''}"
    return {BASE: "base (re-plan every 8)"}.get(cond, cond.replace("shift_", "shift: ").replace("replan", "re-plan "
                                                                                                  "every ")
                                                .replace("delay", "observation delay "))


# ---------------------------------------------------------------------------------------------------------------------
# Plots


def _plot_capacity(out: Path, points: list[dict]) -> Path | None:
    pts = [p for p in points if p["video_params"] and p["cotrain"] is not None]
    if not pts:
        return None
    from fastwam.viz import pyplot, save_figure

    plt = pyplot()

    pts.sort(key=lambda p: p["video_params"])
    x = np.array([p["video_params"] / 1e6 for p in pts])
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    est = np.array([100 * p["cotrain"]["estimate"] for p in pts])
    lo = np.array([100 * p["cotrain"]["ci95"][0] for p in pts])
    hi = np.array([100 * p["cotrain"]["ci95"][1] for p in pts])
    axes[0].errorbar(x, est, yerr=[est - lo, hi - est], fmt="o-", capsize=4, color="#2a7")
    axes[0].axhline(0, color="k", lw=0.8)
    seeds = _seed_counts(p["cotrain"] for p in pts)
    axes[0].set_title(f"co-training effect (fast - no_cotrain; {'/'.join(map(str, seeds))} training seed(s))")
    axes[0].set_ylabel("points (hierarchical 95 % CI)")
    for v, colour in (("fast", "#2a7"), ("no_cotrain", "#a52")):
        r = [p[v] for p in pts]
        e = np.array([100 * q["estimate"] for q in r])
        axes[1].errorbar(x, e, yerr=[e - [100 * q["ci95"][0] for q in r], [100 * q["ci95"][1] for q in r] - e],
                         fmt="o-", capsize=4, color=colour, label=v)
        for xi, q in zip(x, r):
            axes[1].scatter([xi] * len(q["per_seed_a"]), [100 * s for s in q["per_seed_a"]], color=colour, s=10,
                            alpha=0.5)
    axes[1].set_title("success (dots: training seeds)")
    axes[1].set_ylabel("%")
    axes[1].legend()
    vl = [(xi, p["video_loss"]) for xi, p in zip(x, pts) if p["video_loss"] is not None]
    if vl:
        axes[2].plot(*zip(*vl), "o-", color="#37a")
    axes[2].set_title("final video flow loss (fast)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("video expert parameters (M)")
        ax.set_xticks(x, [f"{v:.1f}" for v in x])
        ax.set_xticks([], minor=True)  # a log axis labels its minor ticks too (2x10^0 ...), on top of the sizes
    return save_figure(fig, out / "capacity.png")


def _plot_map(out: Path, forest: list) -> Path | None:
    if not forest:
        return None
    from fastwam.viz import pyplot, save_figure

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(8, 0.5 * len(forest) + 1.5))
    labels = []
    for i, (cell, cond, effects) in enumerate(forest):
        labels.append(f"{cell}: {_label(cond)}")
        for dy, (v, colour) in zip((-0.15, 0.15), (("joint", "#37a"), ("idm", "#a3a"))):
            r = effects.get(v)
            if r is None:
                continue
            e = 100 * r["estimate"]
            ax.errorbar(e, i + dy, xerr=[[e - 100 * r["ci95"][0]], [100 * r["ci95"][1] - e]], fmt="o", capsize=3,
                        color=colour, label=f"{v} - fast" if i == 0 else None)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(forest)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("success difference vs fast (points, hierarchical 95 % CI)")
    seeds = _seed_counts(r for _, _, effects in forest for r in effects.values())
    ax.set_title("Where does test-time imagination pay?"
                 + (f" (training seeds: {', '.join(map(str, seeds))})" if seeds else ""))
    ax.legend(loc="lower right")
    return save_figure(fig, out / "imagination_map.png")


def imagined_still(out: Path, runs: dict) -> Path | None:
    """A still of an imagination policy's rollout video (live frame, then real vs imagined future): the middle frame
    of the first joint / IDM base-condition video found."""
    videos = sorted(p for info in runs.values() if info.get("variant") in ("joint", "idm")
                    for p in (Path(info["eval_dir"]) / "videos").glob("*.mp4"))
    if not videos:
        return None
    import av
    import imageio.v3 as iio

    stills = []
    for video in videos[:3]:
        with av.open(str(video)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        stills.append(frames[len(frames) // 3])
    width = max(s.shape[1] for s in stills)
    stills = [np.pad(s, ((0, 8), (0, width - s.shape[1]), (0, 0)), constant_values=255) for s in stills]
    path = out / "imagined_vs_real.png"
    iio.imwrite(path, np.concatenate(stills, axis=0))
    return path


# ---------------------------------------------------------------------------------------------------------------------
# The report


def write_study_report(out: Path, runs: dict, args: Any, conds: list[str]) -> Path:
    out = Path(out)
    table = load(runs)
    cells = json.loads((out / "cells.json").read_text()) if (out / "cells.json").is_file() else {}
    lines = ["# Fast-WAM on Meta-World: co-training against capacity, and where imagination pays", ""]
    lines += command_and_budget(out, cells, lambda a: f"{a['train_steps']} training steps per model")
    cap_lines, points = capacity_section(out, runs, table, cells)
    map_lines, forest = imagination_section(out, table, cells, conds)
    lines += status_section(table, runs)
    lines += cap_lines + conditions_section(conds) + map_lines + task_structure_section(table, cells, [BASE])
    lines += cotrain_conditions_section(table, cells, conds)
    lines += ["## Verdicts (computed from the intervals)", ""] + verdicts(points, forest) + [""]
    for path, title in ((_plot_capacity(out, points), "co-training against capacity"),
                        (_plot_map(out, forest), "imagination map"),
                        (imagined_still(out, runs), "imagined (bottom row) vs real (top row) futures")):
        if path is not None:
            lines += [f"![{title}]({path.name})", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def command_and_budget(out: Path, cells: dict[str, dict], steps: Any) -> list[str]:
    """The study's recorded command and what it spent; `steps(args)` says how many training steps, in words."""
    meta_path = out / "ablation.json"
    if not meta_path.is_file():
        return []
    meta = json.loads(meta_path.read_text())
    a = meta["args"]
    return ["Command (re-run it to reproduce or to continue an interrupted study):", "",
            f"```\n{meta['command']}\n```", "",
            f"Budget: tasks `{a['tasks']}`; {steps(a)} (batch {meta['config']['train']['batch_size']}, preset "
            f"`{meta['config']['name']}`); training seeds `{a['seeds']}`; evaluation seeds `{a['eval_seeds']}` x "
            f"{a['eval_episodes']} episodes per task (the same layouts for every model); re-plan every {a['replan']} "
            f"actions; at most {a['max_steps']} steps. Cells: "
            + "; ".join(f"`{k}`: {v or 'the preset'}" for k, v in cells.items()) + ".", ""]


def status_section(table: dict, runs: dict) -> list[str]:
    """How much of the planned study has results: a partial study says so before its first number, for the base
    condition and for the evaluation axes (a study whose base is complete may still lack later seeds' axes)."""
    planned: dict[tuple[str, str, str], set[int]] = {}
    for info in runs.values():
        if info.get("seed") is not None:  # baselines are not trained
            for cond in info.get("evals", {BASE: None}):
                planned.setdefault((info.get("cell") or "", info["variant"], cond), set()).add(info["seed"])
    base_rows, axis_done, axis_planned = [], {}, {}
    for (cell, variant, cond), seeds in sorted(planned.items()):
        model = f"{cell + '/' if cell else ''}{variant}"
        done = len(set(table.get((cell, variant, cond), {})) & seeds)
        if cond == BASE:
            base_rows.append((model, done, len(seeds)))
        else:
            axis_done[model] = axis_done.get(model, 0) + done
            axis_planned[model] = axis_planned.get(model, 0) + len(seeds)
    base_missing = any(done < n for _, done, n in base_rows)
    axes_missing = any(axis_done[m] < axis_planned[m] for m in axis_planned)
    if not base_missing and not axes_missing:
        return []
    text = "**Partial study.** "
    if base_missing:
        text += ("Training seeds evaluated so far (base condition), per model: "
                 + ", ".join(f"{m} {d}/{n}" for m, d, n in base_rows) + ". ")
    else:
        text += "The base condition has every training seed of every model. "
    if axes_missing:
        text += ("Evaluations along the axes done so far (conditions x training seeds), per model: "
                 + ", ".join(f"{m} {axis_done[m]}/{axis_planned[m]}" for m in sorted(axis_planned)) + ". ")
    return [text + f"Comparisons with fewer than {MIN_SEEDS} training seeds are marked provisional: their intervals "
            "cannot count the seed-to-seed spread. Re-run the command above to continue.", ""]


def verdicts(points: list[dict], forest: list) -> list[str]:
    out = []
    for p in points:
        co = p["cotrain"]
        if co is None:
            continue
        out.append(f"- Cell {p['cell']} ({(p['video_params'] or 0) / 1e6:.1f}M video parameters): video co-training "
                   f"{_ci(co)} points (MDE {100 * co['mde80']:.1f}): {_sign(co)}.")
    for cell, cond, effects in forest:
        parts = [f"{v} {_ci(r)}: {_sign(r)}" for v, r in effects.items() if r is not None]
        out.append(f"- Cell {cell}, {_label(cond)}: imagination " + "; ".join(parts) + ".")
    return out or ["- No comparison has results yet."]
