"""The report of a video-prior study (`fastwam ablate` with cells that name `init`, `demos` or `video_ratio`).

The question: does video co-training pay once there is a pretrained video prior to keep, and at which amount of
action data? Cells are recognised by what they name (cells.json), not by their names:
- `init=prior|scratch` x `demos=N` cells with fast and no_cotrain: the prior x objective table, one per data size;
- a cell with `video_ratio=R`: fast co-trained with action-free clips, against the cell of the same data and start
  without them (video-only co-training);
- cells with joint / idm: the imagination rows (joint - fast, idm - fast) under every evaluation condition.
Every interval is the hierarchical bootstrap of `sweep_report` (training seeds, then episodes paired on the shared
layouts), with per-seed numbers and the minimum detectable effect; verdicts are derived from the intervals.

What the report needs beyond the evaluations (the corpus and the labelled data's sizes, how long pretraining took)
is gathered into OUT/facts.json while the study's files are there, and read back from it afterwards, so a published
copy re-renders the same report. The pretraining curves come from the priors' metrics.jsonl (published, thinned),
the imagined frames from their samples/ (kept as OUT/prior_samples.png).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from fastwam.eval.stats import markdown_table
from fastwam.files import write_text_atomic
from fastwam.study.sweep_report import (
    BASE,
    _arm,
    _ci,
    _compare,
    _label,
    _seed_counts,
    _seeds,
    _sign,
    _video_loss,
    command_and_budget,
    conditions_section,
    cotrain_conditions_section,
    load,
    status_section,
)

FACTS = "facts.json"
SAMPLES = "prior_samples.png"


# ---------------------------------------------------------------------------------------------------------------------
# What the cells are


def roles(cells: dict[str, dict], episodes_per_task: int) -> dict[str, dict]:
    """cell -> {"init", "demos", "video_ratio"} as the cell's spec says (defaults: scratch, the study's data)."""
    return {name: {"init": spec.get("init", "scratch"), "demos": int(spec.get("demos", episodes_per_task)),
                   "video_ratio": float(spec["video_ratio"]) if "video_ratio" in spec else 0.0}
            for name, spec in cells.items()}


def _cell_for(r: dict[str, dict], init: str, demos: int, video: bool = False) -> str | None:
    for name, role in r.items():
        if role["init"] == init and role["demos"] == demos and (role["video_ratio"] > 0) == video:
            return name
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Facts gathered from the study's files (kept in facts.json for published copies)


def gather_facts(out: Path, args: Any, runs: dict) -> dict:
    """Sizes of the corpus and the labelled datasets, and the pretraining runs' time and loss: read from the study's
    files when they are there, else from OUT/facts.json (a published copy)."""
    path = out / FACTS
    old = json.loads(path.read_text()) if path.is_file() else {}
    facts: dict[str, Any] = {**old, "datasets": dict(old.get("datasets", {})),
                             "pretraining": dict(old.get("pretraining", {}))}

    def dataset(label: str, root: Path) -> None:
        gen = root / "fastwam_generation.json"
        if gen.is_file():
            g = json.loads(gen.read_text())
            a = g.get("args", {})
            facts["datasets"][label] = {
                "episodes": g["episodes"], "frames": g["frames"], "tasks": len(g.get("per_task", {})),
                "action_free": bool(g.get("action_free")), "policies": a.get("policies", "expert"),
                "keep_failures": bool(a.get("keep_failures")), "failures_kept": g.get("failures_kept", 0),
                "max_steps": a.get("max_steps"), "seed": a.get("seed"),
                "wall_minutes": round(g["wall_seconds"] / 60, 1),
                "size_mb": round(g.get("size_bytes", 0) / 1e6, 1)}

    data_dir = Path(args.dataset) if args.dataset else out / "data"
    dataset(f"labelled ({args.episodes_per_task} per task)", data_dir)
    for d in sorted(out.glob("data_demos*")):
        dataset(f"labelled ({d.name.removeprefix('data_demos')} per task)", d)
    if args.pretrain_dataset:
        dataset("video corpus", Path(args.pretrain_dataset))
    durations = out / "logs" / "durations.json"
    minutes = json.loads(durations.read_text()) if durations.is_file() else {}
    for prior in sorted((out / "runs").glob("prior_s*")):
        rows = _metrics(prior)
        if not rows:
            continue
        seed = prior.name.removeprefix("prior_s")
        if seed in facts["pretraining"] and not (prior / "checkpoints").is_dir():
            continue  # a published copy: its metrics.jsonl is thinned (another median it/s); the facts are kept
        entry = dict(facts["pretraining"].get(seed, {}))
        entry.update(steps=rows[-1]["step"], final_video_loss=round(float(np.mean([r["video"] for r in rows[-5:]])), 4))
        if f"pretrain_s{seed}" in minutes:
            entry["minutes"] = minutes[f"pretrain_s{seed}"]
        its = [r["it_s"] for r in rows if "it_s" in r]
        if its:
            entry["median_it_s"] = round(float(np.median(its)), 2)
        facts["pretraining"][seed] = entry
    write_text_atomic(path, json.dumps(facts, indent=1, sort_keys=True) + "\n")
    return facts


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [r for r in rows if "video" in r and "val_video" not in r]


def facts_section(facts: dict, args: Any) -> list[str]:
    ds, pre = facts["datasets"], facts["pretraining"]
    if not ds and not pre:
        return []
    lines = ["## The video corpus and the prior", ""]
    rows = []
    for label, d in ds.items():
        how = (f"{d['policies']}" + (f", failures kept ({d['failures_kept']})" if d["keep_failures"] else "")
               + (f", at most {d['max_steps']} steps" if d.get("max_steps") else ""))
        rows.append([label, "action-free" if d["action_free"] else "actions + state", d["tasks"], d["episodes"],
                     f"{d['frames']:,}", how, f"env seed {d['seed']}", f"{d['wall_minutes']:.0f} min",
                     f"{d['size_mb']:.0f} MB"])
    if rows:
        lines += [markdown_table(["data", "kind", "tasks", "episodes", "frames", "played by", "layouts",
                                  "generated in", "size"], rows), ""]
    corpus = ds.get("video corpus")
    full = ds.get(f"labelled ({args.episodes_per_task} per task)")
    if corpus and full:
        lines += [f"The corpus holds {corpus['frames'] / full['frames']:.1f}x the frames of the full action-labelled "
                  f"set ({corpus['frames']:,} vs {full['frames']:,}), over {corpus['tasks']} tasks where the policies "
                  f"are evaluated on {full['tasks']}; its layouts come from other environment seeds than the "
                  "demonstrations' and the evaluation's.", ""]
    if pre:
        prow = [[s, p.get("steps", "-"), f"{p['minutes']:.0f} min" if "minutes" in p else "-",
                 p.get("median_it_s", "-"), f"{p['final_video_loss']:.3f}"] for s, p in sorted(pre.items())]
        lines += ["Pretraining, one video prior per training seed (the video expert alone, `fastwam pretrain`), "
                  "shared by every cell that starts from it:", "",
                  markdown_table(["training seed", "steps", "wall time", "median it/s", "final video loss"], prow),
                  ""]
    return lines


# ---------------------------------------------------------------------------------------------------------------------
# Sections


def prior_objective_section(table: dict, r: dict[str, dict]) -> tuple[list[str], list[dict]]:
    sizes = sorted({role["demos"] for role in r.values() if role["video_ratio"] == 0})
    rows, points = [], []
    for demos in sizes:
        for init in ("scratch", "prior"):
            cell = _cell_for(r, init, demos)
            if cell is None:
                continue
            fast, none = _arm(table, cell, "fast", BASE), _arm(table, cell, "no_cotrain", BASE)
            if not fast and not none:
                continue
            co = _compare(fast, none)
            point = {"cell": cell, "demos": demos, "init": init, "fast": _compare(fast),
                     "no_cotrain": _compare(none), "cotrain": co}
            points.append(point)
            rows.append([f"{demos}", init, cell, _ci(point["fast"], signed=False), _seeds(point["fast"]),
                         _ci(point["no_cotrain"], signed=False), _seeds(point["no_cotrain"]), _ci(co),
                         f"{100 * co['mde80']:.1f}" if co else "-", _sign(co)])
    if not rows:
        return [], points
    lines = ["## Prior x objective", "",
             "MT10 success in % (mean over training seeds of the mean per-task success) with hierarchical 95 % "
             "intervals, per-seed numbers beside them; co-training = fast - no_cotrain in points; MDE = the smallest "
             "true effect this design detects with 80 % power. `prior`: the video expert starts from the training "
             "seed's video prior and the action expert is interpolated from it (`fastwam train --init-from`); "
             "`scratch`: both random.", "",
             markdown_table(["demos / task", "start", "cell", "fast", "per seed", "no_cotrain", "per seed",
                             "co-training, points", "MDE", "verdict"], rows), ""]
    effects = []
    for demos in sizes:
        s, p = _cell_for(r, "scratch", demos), _cell_for(r, "prior", demos)
        if s is None or p is None:
            continue
        for v in ("fast", "no_cotrain"):
            eff = _compare(_arm(table, p, v, BASE), _arm(table, s, v, BASE))
            if eff is not None:
                effects.append([f"{demos}", v, _ci(eff), _seeds(eff, "per_seed_a"), _seeds(eff, "per_seed_b"),
                                f"{100 * eff['mde80']:.1f}", _sign(eff)])
    if effects:
        lines += ["What the prior itself buys (prior - scratch, the same objective and data):", "",
                  markdown_table(["demos / task", "objective", "prior - scratch, points", "prior per seed",
                                  "scratch per seed", "MDE", "verdict"], effects), ""]
    return lines, points


def video_cotrain_section(table: dict, r: dict[str, dict]) -> tuple[list[str], list[tuple[str, dict | None]]]:
    rows, found = [], []
    for cell, role in r.items():
        if role["video_ratio"] <= 0:
            continue
        arm = _arm(table, cell, "fast", BASE)
        for init in ("scratch", "prior"):
            other = _cell_for(r, init, role["demos"])
            if other is None or not _arm(table, other, "fast", BASE):
                continue
            eff = _compare(arm, _arm(table, other, "fast", BASE))
            found.append((f"{cell} - {other}", eff))
            rows.append([cell, f"{role['video_ratio']:.2f}", role["init"], f"{role['demos']}",
                         _ci(_compare(arm), signed=False), _seeds(_compare(arm)), f"fast of {other} ({init})",
                         _ci(eff), f"{100 * eff['mde80']:.1f}" if eff else "-", _sign(eff)])
    if not rows:
        return [], found
    return ["## Video-only co-training: action-free clips in every batch", "",
            "Fast-WAM trained with the action-free corpus mixed into each batch (`--video-dataset`, the share "
            "`video_ratio` of every batch; those clips add to the video loss only), against fast without them on "
            "the same action data, and against fast from the prior pretrained on the same corpus: two ways of "
            "using the same video.", "",
            markdown_table(["cell", "video share", "start", "demos / task", "fast", "per seed", "against",
                            "difference, points", "MDE", "verdict"], rows), ""], found


def imagination_section(out: Path, table: dict, r: dict[str, dict], conds: list[str]) -> tuple[list[str], list]:
    from fastwam.study.sweep_report import _cell_params

    rows, forest = [], []
    for cell, role in r.items():
        lat = _cell_params(out, cell).get("modes", {})
        fast_ms = lat.get("fast", {}).get("p50_ms")
        for cond in conds:
            fast = _arm(table, cell, "fast", cond)
            effects = {v: _compare(_arm(table, cell, v, cond), fast) for v in ("joint", "idm")}
            if not fast or all(e is None for e in effects.values()):
                continue
            row = [cell, role["init"], f"{role['demos']}", _label(cond), _ci(_compare(fast), signed=False)]
            for v in ("joint", "idm"):
                e = effects[v]
                ms = lat.get(v, {}).get("p50_ms")
                row += [_ci(e), _seeds(e), f"{100 * e['mde80']:.1f}" if e else "-",
                        f"{ms / fast_ms:.1f}x" if ms and fast_ms else "-"]
            rows.append(row)
            forest.append((cell, cond, effects))
    if not rows:
        return [], forest
    return ["## Imagination with a prior", "",
            "Joint and IDM trained from the same video prior as fast; each row one evaluation condition of the same "
            "models. Effects in points (variant - fast), hierarchical 95 % intervals, per-seed success of the "
            "imagination variant, MDE at 80 % power, and the latency paid (batch-1 observation -> chunk, "
            "`fastwam bench latency`, relative to fast).", "",
            markdown_table(["cell", "start", "demos / task", "condition", "fast", "joint - fast", "joint per seed",
                            "MDE", "latency", "idm - fast", "idm per seed", "MDE", "latency"], rows), ""], forest


def verdicts(points: list[dict], video: list, forest: list) -> list[str]:
    out = []
    for p in points:
        if p["cotrain"] is not None:
            out.append(f"- {p['demos']} demos / task, from {p['init']}: video co-training {_ci(p['cotrain'])} points "
                       f"(MDE {100 * p['cotrain']['mde80']:.1f}): {_sign(p['cotrain'])}.")
    for label, eff in video:
        if eff is not None:
            out.append(f"- Action-free clips in every batch, {label}: {_ci(eff)} points: {_sign(eff)}.")
    for cell, cond, effects in forest:
        parts = [f"{v} {_ci(e)}: {_sign(e)}" for v, e in effects.items() if e is not None]
        out.append(f"- {cell}, {_label(cond)}: imagination " + "; ".join(parts) + ".")
    return out or ["- No comparison has results yet."]


# ---------------------------------------------------------------------------------------------------------------------
# Plots


def _plot_grid(out: Path, points: list[dict]) -> Path | None:
    pts = [p for p in points if p["fast"] is not None or p["no_cotrain"] is not None]
    if not pts:
        return None
    from fastwam.viz import pyplot, save_figure

    plt = pyplot()
    sizes = sorted({p["demos"] for p in pts})
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.5 * len(sizes), 4), squeeze=False)
    colours = {"fast": "#2a7", "no_cotrain": "#a52"}
    for ax, demos in zip(axes[0], sizes):
        for i, init in enumerate(("scratch", "prior")):
            p = next((q for q in pts if q["demos"] == demos and q["init"] == init), None)
            if p is None:
                continue
            for j, v in enumerate(("fast", "no_cotrain")):
                r = p[v]
                if r is None:
                    continue
                x = i * 3 + j
                e = 100 * r["estimate"]
                ax.bar(x, e, color=colours[v], alpha=0.75, label=v if i == 0 else None)
                ax.errorbar(x, e, yerr=[[e - 100 * r["ci95"][0]], [100 * r["ci95"][1] - e]], color="k", capsize=4)
                ax.scatter([x] * len(r["per_seed_a"]), [100 * s for s in r["per_seed_a"]], color="k", s=10, zorder=3)
        ax.set_xticks([0.5, 3.5], ["from scratch", "from the video prior"])
        seeds = _seed_counts(q["cotrain"] for q in pts if q["demos"] == demos)
        ax.set_title(f"{demos} demonstrations per task" + (f" ({'/'.join(map(str, seeds))} training seeds)"
                                                          if seeds else ""))
        ax.set_ylabel("MT10 success, % (95 % CI; dots: training seeds)")
        ax.legend(loc="upper left")
    return save_figure(fig, out / "prior_objective.png")


def _plot_pretraining(out: Path, runs: dict, r: dict[str, dict]) -> Path | None:
    priors = sorted((out / "runs").glob("prior_s*"))
    curves = [(p.name, _metrics(p)) for p in priors]
    curves = [(n, rows) for n, rows in curves if rows]
    if not curves:
        return None
    from fastwam.viz import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for name, rows in curves:
        axes[0].plot([x["step"] for x in rows], [x["video"] for x in rows], label=name, lw=1)
    axes[0].set_title("pretraining: video flow loss of the video prior")
    axes[0].set_xlabel("step")
    axes[0].legend()
    for info in runs.values():
        cell = info.get("cell")
        if cell not in r or info["variant"] != "fast" or r[cell]["video_ratio"] > 0 or info["seed"] != 0:
            continue
        rows = _metrics(Path(info["run_dir"]))
        if rows:
            axes[1].plot([x["step"] for x in rows], [x["video"] for x in rows], lw=1,
                         label=f"{cell} ({r[cell]['init']}, {r[cell]['demos']} demos)")
    axes[1].set_title("fine-tuning fast (training seed 0): video flow loss")
    axes[1].set_xlabel("step")
    axes[1].legend()
    return save_figure(fig, out / "pretraining.png")


def prior_samples(out: Path, runs: dict, r: dict[str, dict], full: int) -> tuple[Path | None, str]:
    """Imagined futures, each a pair of rows (real above, imagined below): the first training seed's prior at its
    first and its last sample, then fast fine-tuned from scratch and from the prior on the full data (their last
    samples). Kept at OUT/prior_samples.png with its caption in facts.json (a published copy has no samples/)."""
    import imageio.v3 as iio

    picks, names = [], []
    samples = sorted((out / "runs" / "prior_s0" / "samples").glob("step_*.png"))
    if len(samples) >= 2:
        picks += [samples[0], samples[-1]]
        names += [f"the prior at step {int(samples[0].stem[5:])}", f"the prior at step {int(samples[-1].stem[5:])}"]
    for init in ("scratch", "prior"):
        cell = _cell_for(r, init, full)
        run = next((i for i in runs.values() if i.get("cell") == cell and i["variant"] == "fast" and i["seed"] == 0),
                   None)
        done = sorted((Path(run["run_dir"]) / "samples").glob("step_*.png")) if run else []
        if done:
            picks.append(done[-1])
            names.append(f"fast from {init}, {full} demos per task, step {int(done[-1].stem[5:])}")
    target, caption_file = out / SAMPLES, out / FACTS
    facts = json.loads(caption_file.read_text()) if caption_file.is_file() else {}
    if len(picks) >= 2:
        images = [iio.imread(p) for p in picks]
        width = max(a.shape[1] for a in images)
        pad = lambda a: np.pad(a, ((0, 6), (0, width - a.shape[1]), (0, 0)), constant_values=255)  # noqa: E731
        iio.imwrite(target, np.concatenate([pad(a) for a in images], axis=0))
        facts["samples_caption"] = "imagined futures, top to bottom: " + "; ".join(names) + " (in each pair, " \
                                   "real above, imagined below)"
        write_text_atomic(caption_file, json.dumps(facts, indent=1, sort_keys=True) + "\n")
    if not target.is_file():
        return None, ""
    return target, facts.get("samples_caption", "imagined futures")


# ---------------------------------------------------------------------------------------------------------------------
# The report


def write_prior_report(out: Path, runs: dict, args: Any, conds: list[str]) -> Path:
    out = Path(out)
    table = load(runs)
    cells = json.loads((out / "cells.json").read_text()) if (out / "cells.json").is_file() else {}
    r = roles(cells, args.episodes_per_task)
    facts = gather_facts(out, args, runs)
    lines = ["# Fast-WAM on Meta-World with a video prior: does co-training pay once there is a prior to keep?", ""]
    lines += command_and_budget(out, cells, lambda a: f"{a['train_steps']} training steps per policy and "
                                f"{a.get('pretrain_steps') or a['train_steps']} per video prior")
    grid_lines, points = prior_objective_section(table, r)
    video_lines, video = video_cotrain_section(table, r)
    map_lines, forest = imagination_section(out, table, r, conds)
    lines += status_section(table, runs) + facts_section(facts, args) + grid_lines + video_lines
    lines += conditions_section(conds)
    lines += cotrain_conditions_section(table, cells, conds, "in the prior x objective table") + map_lines
    lines += ["## Verdicts (computed from the intervals)", ""] + verdicts(points, video, forest) + [""]
    losses = {(info.get("cell"), info["variant"]): _video_loss(info["run_dir"]) for info in runs.values()
              if info.get("seed") == 0 and info.get("cell")}
    loss_rows = [[c, v, f"{x:.3f}"] for (c, v), x in sorted(losses.items()) if x is not None and v != "no_cotrain"]
    if loss_rows:
        lines += ["Final video flow loss of each fine-tuned model (training seed 0, mean of its last 5 logs):", "",
                  markdown_table(["cell", "variant", "video loss"], loss_rows), ""]
    samples, caption = prior_samples(out, runs, r, args.episodes_per_task)
    for path, title in ((_plot_grid(out, points), "prior x objective"),
                        (_plot_pretraining(out, runs, r), "pretraining and fine-tuning video loss"),
                        (samples, caption)):
        if path is not None:
            lines += [f"![{title}]({path.name})", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
