"""The prefix pilot's table (scripts/prefix_pilot.sh): training-time action conditioning vs RTC guidance.

    python scripts/prefix_pilot_table.py [--pilot runs/prefix_pilot] [--study runs/realtime] [--cells prior40]

For each cell: the original fast models (the real-time study's evaluations: synchronous, rtc with guidance,
naive), the same models fine-tuned with action_prefix_max (`fast_p8`: rtc by prefix conditioning) and the control
fine-tuned alike without it (`fast_p0`: rtc by guidance; the clean comparison: same fine-tune, only the objective
differs). Success with hierarchical 95 % intervals over training seeds and episodes (the real-time study's
statistics), differences paired on the same layouts, and the seam / within-chunk jump ratio.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fastwam.eval.stats import markdown_table
from fastwam.study.sweep_report import _arm, _ci, _compare, load

DELAYS = (1, 2, 4, 8)


def _runs(pilot: Path, study: Path, cell: str) -> dict:
    runs = {}
    for model, root in (("fast", study), ("fast_p8", pilot), ("fast_p0", pilot)):
        for seed in range(10):
            base = root / "eval" / cell / f"{model}_s{seed}"
            if not (base / "results.json").is_file():
                continue
            evals = {"base": base}
            for kind in ("rtc", "naive"):
                for d in DELAYS:
                    if (base / f"async_{kind}{d}" / "results.json").is_file():
                        evals[f"{kind}{d}"] = base / f"async_{kind}{d}"
            runs[f"{cell}/{model}_s{seed}"] = {"cell": cell, "variant": model, "seed": seed, "evals": evals}
    return runs


def _ratio(table, cell, model, cond) -> str:
    ratios = []
    for results in table.get((cell, model, cond), {}).values():
        sm = next(iter(results["summary"].values()), {}).get("smoothness") or {}
        if sm.get("seam_jump") is not None and sm.get("within_chunk_jump"):
            ratios.append(sm["seam_jump"] / sm["within_chunk_jump"])
    return f"{np.mean(ratios):.2f}" if ratios else "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pilot", default="runs/prefix_pilot")
    parser.add_argument("--study", default="runs/realtime")
    parser.add_argument("--cells", default="prior40")
    args = parser.parse_args()
    for cell in args.cells.split(","):
        table = load(_runs(Path(args.pilot), Path(args.study), cell))
        label = {"fast": "original", "fast_p8": "tuned, prefix 8", "fast_p0": "tuned, no prefix (control)"}
        rows = []
        original_sync = _arm(table, cell, "fast", "base")
        for model in ("fast", "fast_p8", "fast_p0"):
            sync = _arm(table, cell, model, "base")
            if not sync:
                continue
            seeds = "/".join(str(s) for s in sorted(sync))
            vs_original = "(reference)" if model == "fast" else _ci(_compare(sync, original_sync))
            rows.append([label[model], "synchronous", seeds, _ci(_compare(sync), signed=False), "-", vs_original, "-",
                         _ratio(table, cell, model, "base")])
            for kind in ("rtc", "naive"):
                for d in DELAYS:
                    arm = _arm(table, cell, model, f"{kind}{d}")
                    if not arm:
                        continue
                    how = "guidance" if model != "fast_p8" else "prefix"
                    name = f"{kind} ({how}), delay {d}" if kind == "rtc" else f"naive, delay {d}"
                    versus = []
                    for other in ("fast", "fast_p0"):  # the same delay with guidance: original, control
                        guided = _arm(table, cell, other, f"rtc{d}") if model == "fast_p8" and kind == "rtc" else None
                        versus.append(_ci(_compare(arm, guided)) if guided else "-")
                    rows.append([label[model], name, "/".join(str(s) for s in sorted(arm)),
                                 _ci(_compare(arm), signed=False), _ci(_compare(arm, sync)), *versus,
                                 _ratio(table, cell, model, f"{kind}{d}")])
        print(f"### {cell}\n")
        print(markdown_table(["model", "condition", "seeds", "success", "vs its synchronous, points",
                              "vs original (sync: synchronous; rtc: guided at that delay), points",
                              "vs control (guided at that delay), points", "seam / within"], rows))
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
