"""The ablation report: report.md, a success bar chart, training curves — all computed from the run's own files.

Reads OUT/eval/*/results.json (written by `fastwam eval metaworld`) and OUT/runs/*/metrics.jsonl (written by
`fastwam train`). Conclusions are derived from the numbers with bootstrap confidence intervals, never written by
hand: the paper's claim is that video co-training matters much more than test-time imagination, i.e.
(fast - no_cotrain) is large while (joint - fast) and (idm - fast) are small.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastwam.eval.metaworld_results import load_results
from fastwam.eval.stats import fmt_rate, hierarchical_bootstrap, markdown_table, wilson_interval
from fastwam.files import write_text_atomic

PAPER = {  # docs/reference.md, "Reported results": LIBERO average / RoboTwin average
    "fast": (97.6, 91.8), "joint": (98.5, 90.6), "idm": (98.0, 91.3), "no_cotrain": (93.5, 83.8),
}


def _load_results(runs: dict) -> dict[str, dict]:
    out = {}
    for name, info in runs.items():
        path = Path(info["eval_dir"]) / "results.json"
        if path.is_file():
            results = load_results(path.parent)
            if not results.get("partial"):  # an evaluation stopped by Ctrl-C: not a result until it is rerun
                out[name] = results
    return out


def _episode_outcomes(results: dict) -> dict[str, list[int]]:
    """(task, seed) cell -> per-episode 0/1 outcomes (for paired bootstrap across variants)."""
    return {f"{c['task']}|{c['seed']}": list(c["episode_success"]) for c in results["cells"]}


def _variant_cells(names: list[str], results: dict[str, dict]) -> dict[str, list[int]]:
    """Pool a variant's training seeds: outcomes of the same (task, eval seed) cell are concatenated."""
    cells: dict[str, list[int]] = {}
    for n in names:
        for key, outcomes in _episode_outcomes(results[n]).items():
            cells.setdefault(key, []).extend(outcomes)
    return cells


def _rate(cells: dict[str, list[int]]) -> tuple[int, int]:
    return sum(sum(v) for v in cells.values()), sum(len(v) for v in cells.values())


def write_report(out: Path, runs: dict, args: Any) -> Path:
    out = Path(out)
    from fastwam.study.realtime_report import is_realtime_study

    if is_realtime_study(args):  # few-step sampling and asynchronous execution of trained fast models
        from fastwam.study.plan import conditions
        from fastwam.study.realtime_report import write_realtime_report

        return write_realtime_report(out, runs, args, list(conditions(args)))
    if any(info.get("cell") for info in runs.values()):  # a sweep over model cells and evaluation axes
        from fastwam.study.plan import STUDY_KEYS, conditions, parse_cells

        if any(set(spec) & set(STUDY_KEYS) for spec in parse_cells(args.cells).values()):  # the video-prior study
            from fastwam.study.prior_report import write_prior_report

            return write_prior_report(out, runs, args, list(conditions(args)))
        from fastwam.study.sweep_report import write_study_report

        return write_study_report(out, runs, args, list(conditions(args)))
    results = _load_results(runs)
    by_variant: dict[str, list[str]] = {}
    for name, info in runs.items():
        if name in results:
            by_variant.setdefault(info["variant"], []).append(name)
    variants = [v for v in ("fast", "joint", "idm", "no_cotrain") if v in by_variant]
    baselines = [v for v in by_variant if v.startswith("baseline")]
    cells = {v: _variant_cells(by_variant[v], results) for v in variants + baselines}
    tasks = sorted({c["task"] for r in results.values() for c in r["cells"]})

    lines = ["# Fast-WAM four-variant ablation on Meta-World", ""]
    meta_path = out / "ablation.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        lines += ["Command (re-run it to reproduce or to continue an interrupted study):", "",
                  f"```\n{meta['command']}\n```", ""]
        a = meta["args"]
        lines += [
            f"Budget: tasks `{a['tasks']}`; {a['episodes_per_task']} scripted demos per task; "
            f"{a['train_steps']} training steps per model (batch {meta['config']['train']['batch_size']}, "
            f"preset `{meta['config']['name']}`); training seeds `{a['seeds']}`; "
            f"evaluation seeds `{a['eval_seeds']}` x "
            f"{a['eval_episodes']} episodes per task; re-plan every {a['replan']} actions; max {a['max_steps']} steps.",
            "",
        ]
    if not variants:
        lines.append("No evaluation results yet.")
        path = out / "report.md"
        path.write_text("\n".join(lines) + "\n")
        return path

    # --- success table -------------------------------------------------------------------------------------------
    rows = []
    for v in variants + baselines:
        k, n = _rate(cells[v])
        per_task = []
        for t in tasks:
            tk = sum(sum(o) for key, o in cells[v].items() if key.split("|")[0] == t)
            tn = sum(len(o) for key, o in cells[v].items() if key.split("|")[0] == t)
            per_task.append(f"{100 * tk / tn:.0f}" if tn else "-")
        mode = next(iter(results[by_variant[v][0]]["summary"]))
        lat = results[by_variant[v][0]].get("latency", {}).get(mode, {})
        rows.append([v, mode, fmt_rate(k, n), *per_task, f"{lat.get('per_obs_ms_p50', float('nan')):.1f}"])
    lines += ["## Success rate (pooled over tasks, seeds and episodes; 95 % Wilson interval)", "",
              markdown_table(["variant", "mode", "success", *[t.replace("-v3", "") for t in tasks],
                              "ms / obs (batched eval)"], rows), ""]
    if any(len(by_variant[v]) > 1 for v in variants):
        # The pooled intervals above count episodes only; the spread between training seeds shows how much of a
        # difference between variants a second training run alone could move.
        seed_rows = [[v, *[fmt_rate(*_rate(_variant_cells([n], results))) + f" ({n})" for n in sorted(by_variant[v])]]
                     for v in variants]
        width = max(len(r) for r in seed_rows)
        seed_rows = [r + [""] * (width - len(r)) for r in seed_rows]
        lines += ["Per training seed:", "",
                  markdown_table(["variant", *[f"run {i + 1}" for i in range(width - 1)]], seed_rows), ""]

    # --- the paper's comparisons ---------------------------------------------------------------------------------
    comparisons = [("fast", "no_cotrain", "video co-training (fast - no_cotrain)"),
                   ("joint", "fast", "test-time imagination, joint (joint - fast)"),
                   ("idm", "fast", "test-time imagination, IDM (idm - fast)")]
    diff_rows, diffs = [], {}
    arms = {v: [_episode_outcomes(results[n]) for n in sorted(by_variant[v])] for v in variants}
    for a, b, label in comparisons:
        if a in arms and b in arms:
            try:
                d = hierarchical_bootstrap(arms[a], arms[b], n_boot=5000)
            except ValueError:  # different layouts or cells: no paired comparison
                continue
            d["diff"] = d["estimate"]
            diffs[(a, b)] = d
            seeds = " vs ".join("/".join(f"{100 * x:.0f}" for x in d[k]) for k in ("per_seed_a", "per_seed_b"))
            diff_rows.append([label, f"{100 * d['diff']:+.1f}",
                              f"[{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}]", seeds,
                              f"{100 * d['mde80']:.1f}", f"{d['p_boot']:.3f}"])
    if diff_rows:
        lines += ["## The paper's question: what does video buy?", "",
                  "Differences of mean per-task success (points) between variants, averaged over training seeds; "
                  "hierarchical bootstrap 95 % CI (training seeds resampled, then episodes, paired on the same "
                  "evaluation layouts); per-seed success of each side; MDE = the smallest true effect this design "
                  "detects with 80 % power:", "",
                  markdown_table(["effect", "difference", "95 % CI", "per seed (%)", "MDE", "p (bootstrap)"],
                                 diff_rows), ""]
        lines += ["**Verdict (computed from the intervals above):** " + _verdict(diffs), ""]
    lines += ["Paper, for reference (LIBERO avg / RoboTwin avg): " + "; ".join(
        f"{v} {PAPER[v][0]} / {PAPER[v][1]}" for v in ("fast", "joint", "idm", "no_cotrain")) + ".", ""]

    # --- latency -------------------------------------------------------------------------------------------------
    latency_path = out / "latency.json"
    if latency_path.is_file():
        lat = json.loads(latency_path.read_text())
        m = lat["modes"]
        lines += ["## Latency (batch 1, observation -> action chunk, `fastwam bench latency`)", "",
                  markdown_table(["mode", "p50 ms", "p90 ms", "x fast"],
                                 [[k, f"{v['p50_ms']:.1f}", f"{v['p90_ms']:.1f}",
                                   f"{v['p50_ms'] / m['fast']['p50_ms']:.2f}" if "fast" in m else "-"]
                                  for k, v in m.items()]),
                  "", f"Machine: {lat['machine']}", ""]

    # --- pictures ------------------------------------------------------------------------------------------------
    chart = _bar_chart(out, variants + baselines, cells)
    curves = _training_curves(out, runs)
    if chart:
        lines += [f"![success per variant]({chart.name})", ""]
    if curves:
        lines += [f"![training curves]({curves.name})", ""]
    # Where each evaluation's videos are now (its folder's videos/), not the path it recorded, which names wherever
    # the study was run from: a study moved, or re-rendered from a published copy, links the same files.
    videos = [Path(runs[name]["eval_dir"]) / "videos" / Path(p).name for name, r in results.items()
              for p in r.get("videos", [])]
    if videos:
        lines += ["## Rollout videos", "", "Joint / IDM videos show the policy's imagined future beside the real "
                  "rollout.", ""]
        lines += [f"- `{v.relative_to(out) if v.is_relative_to(out) else v}`" for v in videos[:24]]
        lines.append("")
    samples = sorted(out.glob("runs/*/samples/*.png"))
    if samples:
        latest: dict[str, Path] = {}
        for s in samples:
            latest[s.parts[-3]] = s
        lines += ["## Imagined futures during training (top: real clip, bottom: imagined from its first frame)", ""]
        lines += [f"- {name}: ![{name}]({p.relative_to(out)})" for name, p in sorted(latest.items())]
        lines.append("")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _verdict(diffs: dict) -> str:
    def sig(d):  # the interval excludes zero
        return d["ci95"][0] > 0 or d["ci95"][1] < 0

    parts = []
    co = diffs.get(("fast", "no_cotrain"))
    if co is not None:
        parts.append(
            f"video co-training changes success by {100 * co['diff']:+.1f} points "
            + ("(the interval excludes zero)" if sig(co)
               else "(the interval includes zero: not resolved at this budget)"))
    for key, name in ((("joint", "fast"), "joint imagination"), (("idm", "fast"), "IDM imagination")):
        d = diffs.get(key)
        if d is not None:
            parts.append(f"{name} changes it by {100 * d['diff']:+.1f} points "
                         + ("(significant)" if sig(d) else "(not significant)"))
    pattern = None
    if co is not None:
        imag = [diffs[k] for k in (("joint", "fast"), ("idm", "fast")) if k in diffs]
        co_large = sig(co) and co["diff"] > 0
        imag_small = all(abs(d["diff"]) < co["diff"] for d in imag)
        if co_large and not imag:  # only fast and no_cotrain were run: say nothing about imagination
            pattern = ("The paper's co-training finding holds here (test-time imagination was not evaluated in "
                       "this study).")
        elif co_large and imag_small:
            pattern = "The paper's pattern holds here: co-training matters more than test-time imagination."
        elif not sig(co):
            pattern = ("The paper's pattern is not confirmed at this scale: the co-training effect is not "
                       "distinguishable from zero with these intervals.")
        else:
            pattern = "The paper's pattern does not hold here."
    return "; ".join(parts) + (". " + pattern if pattern else ".")


def _bar_chart(out: Path, names: list[str], cells: dict) -> Path | None:
    from fastwam.viz import pyplot, save_figure

    plt = pyplot()

    if not names:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    rates, errs = [], [[], []]
    for v in names:
        k, n = _rate(cells[v])
        lo, hi = wilson_interval(k, n)
        p = k / n if n else 0
        rates.append(100 * p)
        errs[0].append(100 * (p - lo))
        errs[1].append(100 * (hi - p))
    colours = ["#2a7" if v == "fast" else "#888" if v.startswith("baseline") else "#37a" for v in names]
    ax.bar(range(len(names)), rates, yerr=errs, capsize=4, color=colours)
    ax.set_xticks(range(len(names)), [v.replace("baseline ", "") for v in names], rotation=20)
    ax.set_ylabel("success rate (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Meta-World closed-loop success (95 % Wilson CI)")
    return save_figure(fig, out / "success.png")


def _training_curves(out: Path, runs: dict) -> Path | None:
    from fastwam.viz import pyplot, save_figure

    plt = pyplot()

    series = {}
    for name, info in runs.items():
        if info.get("run_dir") is None:
            continue
        path = Path(info["run_dir"]) / "metrics.jsonl"
        if path.is_file():
            rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
            series[name] = [r for r in rows if "action" in r]
    if not series:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in sorted(series.items()):
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, [r["action"] for r in rows], label=name)
        if any(r["video"] > 0 for r in rows):
            axes[1].plot(steps, [r["video"] for r in rows], label=name)
    for ax, title in zip(axes, ("action flow loss", "video flow loss")):
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.legend(fontsize=8)
    return save_figure(fig, out / "training_curves.png")


def _thin_metrics(text: str, keep: int = 200, tail: int = 20) -> str:
    """A training's metrics.jsonl cut to about `keep` evenly spaced rows plus its last `tail` rows whole: the curves
    and the final losses the reports read, without the whole log of a long training."""
    rows = [x for x in text.splitlines() if x.strip()]
    head, last = rows[:-tail] if len(rows) > tail else [], rows[-tail:]
    return "\n".join(head[::max(1, -(-len(head) // keep))] + last) + "\n"


def publish_data(out: Path, dest: Path) -> list[Path]:
    """Copy what the report's numbers are computed from into `dest`, in the study's own layout: every evaluation's
    results.json (compact JSON, same content) and every training's metrics.jsonl (thinned by `_thin_metrics`). The
    study's runs can then be lost (they live on the machine that trained them) and the report still be recomputed:
    `fastwam ablate <the study's command> --out COPY --report-only` on a copy of the published folder. Returns the
    files written."""
    compact = lambda text: json.dumps(json.loads(text), separators=(",", ":")) + "\n"  # noqa: E731
    written = []
    for pattern, transform in (("eval/**/results.json", compact), ("eval/**/timing.json", compact),
                               ("runs/**/metrics.jsonl", _thin_metrics)):
        for src in sorted(out.glob(pattern)):
            target = dest / src.relative_to(out)
            target.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(target, transform(src.read_text()))
            written.append(target)
    return written


def _video_variant(out: Path, video: Path) -> str:
    """The variant whose evaluation made a rollout video: from its evaluation folder (eval/[CELL/]VARIANT_sSEED/...),
    not the file name, which names the inference mode (no_cotrain's videos are "fast_...")."""
    import re

    for part in video.relative_to(out).parts:
        m = re.fullmatch(r"(\w+?)_s\d+", part)
        if m:
            return m.group(1)
    return video.parent.parent.name  # baselines: eval/baseline_zero/videos/


def publish_report(out: Path, dest: Path, videos: int = 3) -> Path:
    """Copy a study's report into the repository's docs: report.md, its pictures, the study's own JSON (command,
    cells, latencies), the data behind its numbers (`publish_data`) and `videos` rollout videos (imagination variants
    first, one per variant before a second), then drop every link of the report whose target was not copied (and a
    section left without any of its links), so a committed report never points at a file that is not in the
    repository. Returns the published report."""
    import re
    import shutil

    out, dest = Path(out), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    keep = [p for pattern in ("*.png", "ablation.json", "cells.json", "latency*.json", "config_*.json", "facts.json")
            for p in sorted(out.glob(pattern))]
    variant = {p: _video_variant(out, p) for p in out.glob("eval/**/videos/*.mp4")}
    found = sorted(variant, key=lambda p: (variant[p] not in ("joint", "idm"), variant[p], str(p)))
    chosen, seen = [], set()
    for p in found:  # one per variant first, then more
        if variant[p] not in seen:
            chosen.append(p)
            seen.add(variant[p])
    chosen += [p for p in found if p not in chosen]
    for src in keep + chosen[:videos]:
        target = dest / src.relative_to(out)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)

    def links(line: str) -> list[str]:
        return [link for link in re.findall(r"\]\(([^)]+)\)", line) + re.findall(r"`([^`\s]+\.(?:mp4|png))`", line)
                if not link.startswith(("http", "#"))]

    sections: list[list[str]] = [[]]
    for line in (out / "report.md").read_text().splitlines():
        if line.startswith("## "):
            sections.append([])
        sections[-1].append(line)
    lines = []
    for section in sections:
        kept = [line for line in section if all((dest / link).exists() for link in links(line))]
        if section[:1] and section[0].startswith("## ") and len(kept) < len(section) and not any(map(links, kept)):
            continue  # a section of links none of which was copied: its heading and text would stand alone
        lines += kept
    data = publish_data(out, dest)
    if data:
        lines += ["", "## The data behind these numbers", "",
                  "Every evaluation's `results.json` (per episode: success, length, highest shaped reward) and every "
                  "training's `metrics.jsonl` (thinned to about 200 rows, the last 20 whole) are published beside "
                  f"this report, in the study's layout (`eval/`, `runs/`; {len(data)} files). The runs themselves stay "
                  "on the machine that trained them; to recompute every table and interval here without them, run "
                  "the command above with `--out` set to a copy of this folder and `--report-only`."]
    published = [f"- `{p.relative_to(out)}`" for p in chosen[:videos]]
    published = [line for line in published if line not in lines]  # not listed twice when the report lists them
    if published:
        lines += ["", "## Sample rollout videos", "",
                  "Joint / IDM videos show the live frame, then for the latest plan the real future (top) and the "
                  "imagined one (bottom).", "", *published]
    report = dest / "report.md"
    write_text_atomic(report, "\n".join(lines).rstrip() + "\n")
    return report
