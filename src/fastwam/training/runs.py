"""Run directories: never lose or shadow a run.

- A new run refuses a directory that already holds checkpoints (it would mix two runs: `latest`, retention and
  metrics.jsonl would interleave them); `--resume` refuses a directory that holds none (it would silently start at 0).
- A resumed run continues under the settings it was trained with. Only the step budget and the settings that cannot
  change the weights (`RUNTIME_FIELDS`: logging / saving cadence, threads, data workers) come from the new command;
  any other difference is refused with the list of fields, unless the caller accepts it (`--accept-changes`). The
  model and codec can never change: the weights were trained for them.
- metrics.jsonl is cut back to the resumed step, so a step re-run after a crash is logged once.
- Ctrl-C (SIGINT) asks the loop to stop after the current step and save a checkpoint; a second Ctrl-C stops at once.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

from fastwam import checkpoint as ckpt_io
from fastwam import interrupt
from fastwam.config import Config
from fastwam.errors import UserError
from fastwam.files import write_text_atomic

Resume = bool | Literal["auto"]

# Settings a resumed run takes from the new command without asking: they change what is logged or saved, or how fast,
# never the weights. (train.steps, the new total, is handled on its own.)
RUNTIME_FIELDS = frozenset({
    "train.log_every", "train.save_every", "train.keep_last", "train.val_every", "train.sample_every",
    "train.threads", "train.wandb", "data.num_workers", "data.cache_in_memory",
})
# Settings a resumed run can never change: the weights were trained for them.
FIXED_SECTIONS = ("model.", "codec.")


def find_resume_checkpoint(run_dir: Path, resume: Resume) -> Path | None:
    """The checkpoint to continue from: None for a new run. Refuses a new run in a used directory, and vice versa."""
    existing = ckpt_io.list_checkpoints(run_dir)
    if resume is False:
        if existing:
            raise UserError(f"{run_dir} already holds a run (checkpoints up to {existing[-1].name}); continue it with "
                            f"--resume, train into another --out, or delete {run_dir}")
        return None
    # A run killed while writing its first checkpoint left only a temporary directory: removed here, whether or not
    # the run then resumes (--resume still refuses a run with no checkpoint; --auto-resume starts it anew).
    cleaned = ckpt_io.remove_stale_temporaries(run_dir) if (run_dir / "checkpoints").is_dir() else []
    try:
        return ckpt_io.resolve_checkpoint(run_dir)
    except ckpt_io.CheckpointError:
        if resume == "auto":
            return None
        note = (f" (removed {len(cleaned)} unfinished checkpoint write(s) of a stopped process)" if cleaned else "")
        raise ckpt_io.CheckpointError(f"--resume: {run_dir} holds no checkpoint to continue from (none under "
                                      f"{run_dir / 'checkpoints'}){note}; drop --resume to start a new run there") \
            from None


def resume_codec(cfg: Config, saved: Config) -> Config:
    """Keep the run's fitted codec statistics (a new fit on changed data must not replace them mid-run)."""
    if cfg.codec.latents_std or not saved.codec.latents_std:
        return cfg
    fitted = dataclasses.replace(cfg.codec, latents_mean=saved.codec.latents_mean, latents_std=saved.codec.latents_std)
    return cfg.replace(codec=fitted) if fitted == saved.codec else cfg  # other codec changes are refused later


def settings_for_resume(new: Config, saved: Config, ckpt: Path, accept_changes: bool) -> tuple[Config, list[str]]:
    """The config a resumed run continues with, and the differences taken from the new command (as `field: a -> b`).

    Raises CheckpointError naming every differing field the run cannot take (all of model / codec; the rest unless
    accept_changes).
    """
    old, cur = _flatten(saved.to_dict()), _flatten(new.to_dict())
    differing = [k for k in cur if k in old and old[k] != cur[k] and k != "train.steps"]
    fixed = [k for k in differing if k.startswith(FIXED_SECTIONS)]
    if fixed:
        raise ckpt_io.CheckpointError(
            f"cannot resume {ckpt}: its weights were trained for other model / codec settings "
            f"({_describe(fixed, old, cur)}); resume without those overrides, or train into another --out")
    refused = [k for k in differing if k not in RUNTIME_FIELDS]
    if refused and not accept_changes:
        raise ckpt_io.CheckpointError(
            f"cannot resume {ckpt} with changed settings ({_describe(refused, old, cur)}); rerun with the run's "
            f"settings, add --accept-changes to continue with these, or train into another --out")
    merged = dict(old)
    for key in ["train.steps", *differing]:
        merged[key] = cur[key]
    return Config.from_dict(_unflatten(merged)), [_describe([k], old, cur) for k in differing]


def _describe(keys: list[str], old: dict, cur: dict) -> str:
    return ", ".join(f"{k}: {_show(old[k])} -> {_show(cur[k])}" for k in keys)


def _show(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, tuple | list) else str(value)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _unflatten(flat: dict[str, Any]) -> dict:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


class MetricsLog:
    """metrics.jsonl, one JSON object a line with its "step".

    Opened at step s it drops the lines of later steps (left by an attempt that went past its last checkpoint) and any
    torn last line, so every step is logged once however often the run was resumed.
    """

    def __init__(self, path: Path, start_step: int):
        self.path = path
        if path.is_file():
            keep = []
            for line in path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(entry, dict) and isinstance(entry.get("step"), int) and entry["step"] <= start_step:
                    keep.append(line + "\n")
            write_text_atomic(path, "".join(keep))

    def append(self, entry: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(entry) + "\n")


class StopRequest(interrupt.StopRequest):
    """Set by Ctrl-C (SIGINT) while installed: the training loop stops after its current step and saves.

    A second Ctrl-C raises KeyboardInterrupt at once (the CLI reports it in one line). Outside the main thread no
    handler can be installed and Ctrl-C keeps its default behaviour.
    """

    message = "Ctrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to stop at once)"
