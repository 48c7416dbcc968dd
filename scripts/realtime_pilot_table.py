"""The table of `scripts/realtime_pilot.sh`: success per condition (Wilson 95 %), the paired bootstrap difference to
the 10-step synchronous reference (same layouts, episode-paired), and the executed actions' jumps at chunk seams vs
within chunks. Usage: python scripts/realtime_pilot_table.py [OUT] [REFERENCE_EVAL_DIR]"""

import json
import sys
from pathlib import Path

from fastwam.eval.stats import bootstrap_diff_ci, fmt_rate, markdown_table


def cells(results: dict) -> dict[str, list[int]]:
    return {f"{c['task']}/{c['seed']}": c["episode_success"] for c in results["cells"]}


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/realtime_pilot")
    ref_dir = out / "steps10"
    ref = json.loads((ref_dir / "results.json").read_text()) if (ref_dir / "results.json").is_file() else None
    rows = []
    for path in sorted(out.glob("*/results.json")):
        r = json.loads(path.read_text())
        mode = r["config"]["modes"][0]
        s = r["summary"][mode]
        k, n = s["pooled"]["successes"], s["pooled"]["episodes"]
        diff = ""
        if ref is not None and path.parent != ref_dir:
            d = bootstrap_diff_ci(cells(r), cells(ref), paired=True)
            diff = f"{100 * d['diff']:+.1f} [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}]"
        sm = s.get("smoothness") or {}
        fmt = lambda x: "" if x is None else f"{x:.3f}"  # noqa: E731
        ratio = (sm["seam_jump"] / sm["within_chunk_jump"]) if sm.get("seam_jump") and sm.get("within_chunk_jump") \
            else None
        cfg = r["config"]
        rows.append([path.parent.name, cfg.get("inference_steps"), cfg.get("chunking", "sync (today)"),
                     cfg.get("inference_delay", 0), fmt_rate(k, n), diff, fmt(sm.get("seam_jump")),
                     fmt(sm.get("within_chunk_jump")), fmt(ratio)])
    print(markdown_table(["condition", "steps", "chunking", "delay", "success", "vs 10-step sync (paired)",
                          "seam jump", "within-chunk jump", "seam / within"], rows))


if __name__ == "__main__":
    main()
