"""Results of `fastwam eval metaworld`: the results.json dict and its markdown summary.

`_assemble` turns the per-mode rollouts into per-(task, seed, mode) cells with Wilson 95 % intervals, per-mode
summaries, policy latency and throughput; `summary_markdown` renders them. An evaluation stopped early (Ctrl-C) gives
the same layout with `"partial": true`: each cell counts the episodes that finished (`episodes`) beside the planned
number (`episodes_planned`) and names them (`episode_index`), and the means are over the cells that have episodes.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable
from pathlib import Path

from fastwam.eval.envpool import EnvSettings
from fastwam.eval.metaworld_policies import _Adapter
from fastwam.eval.metaworld_rollout import EVAL_SEED_BASE, env_seed_for
from fastwam.eval.stats import fmt_rate, markdown_table, percentile, rate_summary


def _mean(values: Iterable[float]) -> float:
    """The mean, 0.0 for none (a partial evaluation's cells without episodes)."""
    values = list(values)
    return statistics.fmean(values) if values else 0.0


def _latency(calls: list[dict]) -> dict:
    if not calls:
        return {"calls": 0}
    ms = [c["ms"] for c in calls]
    per_obs = [c["ms"] / c["batch"] for c in calls]
    return {"calls": len(calls), "mean_batch": statistics.fmean(c["batch"] for c in calls),
            "infer_batch_ms_p50": percentile(ms, 0.5), "infer_batch_ms_p90": percentile(ms, 0.9),
            "per_obs_ms_p50": percentile(per_obs, 0.5)}


def _assemble(adapter: _Adapter, runs: list[dict], modes: list[str], tasks: list[str], seeds: list[int],
              episodes: int, k: int, max_steps: int, settings: EnvSettings, slots: int, workers: int, groups: int,
              render_flag: bool, pool_start_s: float, wall_s: float) -> dict:
    """The results dict of an evaluation. `runs`: `_run_mode`'s outputs, one per mode that ran (a mode without one, not
    reached before a Ctrl-C, gets cells without episodes). Partial when fewer episodes finished than were planned."""
    cells, summary, latency, videos = [], {}, {}, []
    by_mode = {run["mode"]: run for run in runs}
    planned = len(tasks) * len(seeds) * episodes * len(modes)
    done = sum(len(run["records"]) for run in runs)
    partial = done < planned
    for m in modes:
        run = by_mode.get(m) or {"mode": m, "records": [], "calls": [], "videos": [], "env_steps": 0,
                                 "rollout_s": 0.0, "overhead": {}}
        latency[m] = _latency(run["calls"])
        videos += run["videos"]
        per_task = {}
        for t in tasks:
            for s in seeds:
                recs = sorted((r for r in run["records"] if r["task"] == t and r["seed"] == s),
                              key=lambda r: r["episode"])
                kk = sum(r["success"] for r in recs)
                cell = {"task": t, "seed": s, "env_seed": env_seed_for(s), "mode": m, **rate_summary(kk, len(recs)),
                        "mean_episode_length": statistics.fmean(r["length"] for r in recs) if recs else 0.0,
                        "latency": _latency([c for c in run["calls"] if any(tuple(x) == (t, s) for x in c["cells"])]),
                        "episode_success": [int(r["success"]) for r in recs],
                        "episode_length": [r["length"] for r in recs],
                        "episode_max_reward": [round(r["max_reward"], 4) for r in recs]}
                if partial:  # which episodes finished (they need not be the first ones)
                    cell.update(episodes_planned=episodes, episode_index=[r["episode"] for r in recs])
                cells.append(cell)
            tc = [c for c in cells if c["task"] == t and c["mode"] == m]
            ks, ns = sum(c["successes"] for c in tc), sum(c["episodes"] for c in tc)
            per_task[t] = {**rate_summary(ks, ns),
                           "mean_episode_length": _mean(c["mean_episode_length"] for c in tc if c["episodes"])}
        mc = [c for c in cells if c["mode"] == m]
        ks, ns = sum(c["successes"] for c in mc), sum(c["episodes"] for c in mc)
        summary[m] = {
            "mean_success_rate": _mean(v["success_rate"] for v in per_task.values() if v["episodes"]),
            "pooled": {**rate_summary(ks, ns)},
            "per_seed_mean_success_rate": {
                str(s): _mean(c["success_rate"] for c in mc if c["seed"] == s and c["episodes"]) for s in seeds},
            "tasks": per_task,
            "env_steps": run["env_steps"],
            "rollout_s": run["rollout_s"],
            "env_steps_per_s": run["env_steps"] / max(run["rollout_s"], 1e-9),
            "envs_built": run["overhead"].get("envs_built", 0),
            "skipped_resets": run["overhead"].get("skipped_resets", 0),
        }
        if run.get("smoothness") is not None:  # executed-action jumps at chunk seams vs within chunks
            summary[m]["smoothness"] = run["smoothness"]
    total_steps = sum(r["env_steps"] for r in runs)
    rollout_s = sum(r["rollout_s"] for r in runs)
    progress = {"episodes_done": done, "episodes_planned": planned} if partial else {}
    return {
        "partial": partial,
        **progress,
        "config": {
            "policy": adapter.name, **adapter.info, "modes": modes, "tasks": tasks, "seeds": seeds,
            "env_seeds": [env_seed_for(s) for s in seeds], "env_seed_rule": f"env_seed = {EVAL_SEED_BASE} + seed",
            "episodes_per_seed": episodes, "episode_rule": "episode i = the env's i-th reset (layout i of the seed)",
            "horizon": adapter.horizon, "replan": k, "max_steps": max_steps,
            "image_size": list(settings.image_size), "cameras": list(settings.cameras),
            "num_envs": slots, "workers": workers, "pipeline_groups": groups,
            "harness_check_only": adapter.name == "scripted",
        },
        "cells": cells,
        "summary": summary,
        "latency": latency,
        "throughput": {"env_steps": total_steps, "rollout_s": rollout_s,
                       "env_steps_per_s": total_steps / max(rollout_s, 1e-9),
                       "pool_start_s": pool_start_s, "wall_s": wall_s, "render_every_step": not render_flag},
        "videos": videos,
    }


# Where an evaluation's wall-clock measurements live: timing.json beside results.json. results.json then holds only
# what the policy did (a function of the checkpoint and the settings: the same bytes on any machine or executor,
# `fastwam ablate --executor local|ray` included); timing.json holds how long it took.
TIMING_FILE = "timing.json"
_SUMMARY_TIMING = ("rollout_s", "env_steps_per_s")


def split_timing(results: dict) -> tuple[dict, dict]:
    """The results dict -> (outcome, timing): every latency / throughput measurement moved to the second."""
    outcome = json.loads(json.dumps(results))
    timing = {"latency": outcome.pop("latency", {}), "throughput": outcome.pop("throughput", {}), "cells": [],
              "summary": {}}
    for cell in outcome.get("cells", []):
        if "latency" in cell:
            timing["cells"].append({"task": cell["task"], "seed": cell["seed"], "mode": cell["mode"],
                                    "latency": cell.pop("latency")})
    for mode, summary in outcome.get("summary", {}).items():
        timing["summary"][mode] = {k: summary.pop(k) for k in _SUMMARY_TIMING if k in summary}
    return outcome, timing


def merge_timing(outcome: dict, timing: dict) -> dict:
    """`split_timing` undone (the dict `evaluate` returned)."""
    results = json.loads(json.dumps(outcome))
    results["latency"], results["throughput"] = timing.get("latency", {}), timing.get("throughput", {})
    by_cell = {(c["task"], c["seed"], c["mode"]): c["latency"] for c in timing.get("cells", [])}
    for cell in results.get("cells", []):
        key = (cell["task"], cell["seed"], cell["mode"])
        if key in by_cell:
            cell["latency"] = by_cell[key]
    for mode, values in timing.get("summary", {}).items():
        results.get("summary", {}).get(mode, {}).update(values)
    return results


def load_results(eval_dir: Path) -> dict:
    """An evaluation's results.json with its timing.json merged back in (evaluations written before the split kept
    their timing inside results.json: read as they are)."""
    results = json.loads((Path(eval_dir) / "results.json").read_text())
    timing = Path(eval_dir) / TIMING_FILE
    if timing.is_file():
        results = merge_timing(results, json.loads(timing.read_text()))
    return results


def summary_markdown(results: dict) -> str:
    cfg = results["config"]
    lines = [f"# Meta-World evaluation: {cfg['policy']}", ""]
    if cfg.get("checkpoint"):
        lines.append(f"Checkpoint: `{cfg['checkpoint']}`  ")
    if cfg.get("server"):
        lines.append(f"Server: `{cfg['server']}`  ")
    lines.append(f"Tasks: {len(cfg['tasks'])}; seeds {cfg['seeds']} (env seeds {cfg['env_seeds']}); "
                 f"{cfg['episodes_per_seed']} episodes per task and seed; chunk {cfg['horizon']}, execute "
                 f"{cfg['replan']}, max {cfg['max_steps']} steps; cameras {cfg['cameras']} at "
                 f"{cfg['image_size'][0]}x{cfg['image_size'][1]}.")
    if results.get("partial"):
        lines += ["", f"**Partial: stopped early (Ctrl-C) after {results['episodes_done']} of "
                      f"{results['episodes_planned']} episodes. Each cell counts the episodes that finished; means "
                      f"are over the cells that have any.**"]
    if cfg.get("harness_check_only"):
        lines += ["", "**Scripted expert with privileged simulator state: a harness check, not a result.**"]
    lines += ["", "Success rate in % with Wilson 95 % interval (successes/episodes), seeds pooled per task.", ""]
    modes = cfg["modes"]
    cells = {t: {} for t in cfg["tasks"]}
    for c in results["cells"]:
        cur = cells[c["task"]].get(c["mode"], (0, 0))
        cells[c["task"]][c["mode"]] = (cur[0] + c["successes"], cur[1] + c["episodes"])
    rows = [[t, *[fmt_rate(*cells[t][m]) for m in modes]] for t in cfg["tasks"]]
    means = ["**mean over tasks**"]
    for m in modes:
        s = results["summary"][m]
        p = s["pooled"]
        means.append(f"{100 * s['mean_success_rate']:.1f} [{100 * p['ci95'][0]:.1f}, {100 * p['ci95'][1]:.1f}] "
                     f"({p['successes']}/{p['episodes']})")
    lines.append(markdown_table(["task", *modes], rows + [means]))
    lines.append("The mean row's interval pools all episodes (tasks differ in difficulty; compare policies with "
                 "`fastwam.eval.stats.bootstrap_diff_ci` on the per-episode outcomes in results.json).")
    lines += ["", "## Per seed (mean success over tasks, %)", ""]
    lines.append(markdown_table(["mode", *[f"seed {s}" for s in cfg["seeds"]]],
                                [[m, *[f"{100 * results['summary'][m]['per_seed_mean_success_rate'][str(s)]:.1f}"
                                       for s in cfg["seeds"]]] for m in modes]))
    lines += ["", "## Episode length and speed", ""]
    rows = []
    for m in modes:
        s, lat = results["summary"][m], results["latency"][m]
        mean_len = _mean(v["mean_episode_length"] for v in s["tasks"].values() if v["episodes"])
        rows.append([m, f"{mean_len:.0f}", f"{lat.get('infer_batch_ms_p50', 0):.1f}",
                     f"{lat.get('per_obs_ms_p50', 0):.2f}", f"{lat.get('mean_batch', 0):.1f}",
                     f"{s['env_steps_per_s']:.0f}"])
    lines.append(markdown_table(["mode", "mean episode length", "policy call p50 (ms)", "per observation p50 (ms)",
                                 "mean batch", "env steps/s"], rows))
    t = results["throughput"]
    lines.append(f"{cfg['num_envs']} environments over {cfg['workers']} worker process(es) "
                 f"({'pipelined' if cfg.get('pipeline_groups', 1) > 1 else 'lock-step'}); "
                 f"{t['env_steps']} env steps in {t['rollout_s']:.1f} s of rollout ({t['env_steps_per_s']:.0f}/s), "
                 f"{t['wall_s']:.1f} s wall in all.")
    if results["videos"]:
        lines += ["", "## Videos", "",
                  "Cameras side by side. Joint / IDM: left, the live rollout (2x); right, for the latest re-plan, "
                  "what really happened at the planned frames (top; grey after the episode ended) and what the policy "
                  "imagined for them (bottom).", ""]
        lines += [f"- `{Path(v).name}`" for v in results["videos"]]
    return "\n".join(lines) + "\n"
