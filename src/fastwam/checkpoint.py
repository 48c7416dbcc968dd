"""Checkpoints: safetensors + JSON only (never pickle), written atomically.

A checkpoint is a directory:
    config.json          the full resolved Config
    model.safetensors    trainable weights (frozen codec / text encoder are rebuilt from the config, not stored)
    ema.safetensors      EMA weights, when training kept an EMA
    norm_stats.json      normalisation statistics of the training data (inference un-normalises with them)
    train_state/         optimizer.safetensors + state.json (step, scheduler, RNG, data position) — for --resume
A run directory holds `checkpoints/step_XXXXXXX/` and a `latest` file naming the newest complete one.

Atomicity: everything is written into `step_X.tmp-<pid>/`, flushed to disk (fsync), and renamed into place in one
`os.rename`, then `latest` is replaced with `os.replace`. A process killed (or a machine losing power) at any moment
leaves either the old or the new checkpoint complete; the `*.tmp-<pid>` it leaves (a full model file each) is removed
by the next save, once that pid is no longer running.

Reproducible files: the same tensors give the same bytes (keys sorted, one fixed metadata entry: safetensors orders a
metadata map of two or more entries differently from call to call), and every file gets the mode a plain `open()`
gives (0644 under the usual umask; safetensors itself writes 0600).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fastwam.config import Config
from fastwam.errors import UserError
from fastwam.files import fsync_path, write_text_atomic

CONFIG, WEIGHTS, EMA, NORM_STATS, TRAIN_STATE = "config.json", "model.safetensors", "ema.safetensors", \
    "norm_stats.json", "train_state"


class CheckpointError(UserError):
    """A checkpoint or run directory is missing, incomplete, corrupt or does not fit: the message names the file."""


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True))


def _file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _file_mode()  # read once: os.umask can only be read by setting it


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors with sorted keys and fixed metadata (identical tensors -> identical bytes), mode as open() gives."""
    save_file(dict(sorted(tensors.items())), str(path), metadata={"format": "pt"})
    os.chmod(path, _FILE_MODE)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type (and OSError) for broken files
        raise CheckpointError(f"{path}: cannot read it ({' '.join(str(e).split())}); the file is truncated or not "
                              "safetensors — use another checkpoint, or re-save this one") from None


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); the file is truncated or corrupt") from None


def _state_dict_for_save(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared / non-contiguous storage; our parameters are independent, so clone-free contiguous.
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    config: Config,
    model: torch.nn.Module,
    norm_stats: dict | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    train_state: dict | None = None,
    ema: torch.nn.Module | None = None,
    keep_last: int = 0,
) -> Path:
    """Write checkpoints/step_{step}/ atomically and point `latest` at it. Returns the checkpoint directory.

    keep_last > 0 keeps that many checkpoints: the one just written and the newest others by step.
    """
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(run_dir)
    final = ckpt_root / f"step_{step:07d}"
    tmp = ckpt_root / f"{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    _write_json(tmp / CONFIG, config.to_dict())
    _save_tensors(_state_dict_for_save(model), tmp / WEIGHTS)
    if ema is not None:
        _save_tensors(_state_dict_for_save(ema), tmp / EMA)
    if norm_stats is not None:
        _write_json(tmp / NORM_STATS, norm_stats)
    if optimizer is not None or train_state is not None:
        (tmp / TRAIN_STATE).mkdir()
        meta = {}
        if optimizer is not None:
            tensors, meta = optimizer_to_tensors(optimizer)
            _save_tensors(tensors, tmp / TRAIN_STATE / "optimizer.safetensors")
        _write_json(tmp / TRAIN_STATE / "state.json", {"step": step, "optimizer": meta, **(train_state or {})})
    # Data before names: every file and directory entry reaches the disk before the rename publishes the checkpoint,
    # so a power cut cannot leave a complete-looking step directory holding unwritten weights.
    for written in sorted(tmp.rglob("*"), reverse=True):
        fsync_path(written)
    fsync_path(tmp)
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    write_text_atomic(ckpt_root / "latest", final.name)  # its fsync of checkpoints/ also persists the rename above
    if keep_last > 0:
        others = sorted(p for p in ckpt_root.glob("step_*") if ".tmp-" not in p.name and p != final)
        for old in others[: max(0, len(others) - (keep_last - 1))]:
            _delete_checkpoint(old)
    return final


def _delete_checkpoint(path: Path) -> None:
    """Take a checkpoint out of the checkpoint namespace in one rename, then delete it: a process killed while
    deleting leaves a `.deleting-*` directory (removed by the next save), never a `step_*` that is half gone."""
    doomed = path.with_name(f".deleting-{path.name}-{os.getpid()}")
    try:
        os.rename(path, doomed)
    except OSError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def remove_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Remove the `*.tmp-<pid>` left in checkpoints/ by writers that are no longer running (or by this process).

    A live pid's temporary is a save in progress (another process writing into the same run) and is left alone.
    """
    removed = []
    root = Path(run_dir) / "checkpoints"
    for p in sorted(root.glob(".deleting-*")):  # a rotation killed mid-delete (see `_delete_checkpoint`)
        pid = p.name.rsplit("-", 1)[1]
        if pid.isdigit() and (int(pid) == os.getpid() or not _pid_alive(int(pid))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    for p in sorted(root.glob("*.tmp-*")):
        pid = p.name.rsplit(".tmp-", 1)[1]
        if not pid.isdigit() or (int(pid) != os.getpid() and _pid_alive(int(pid))):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The complete checkpoints of a run directory (those with model weights), by step."""
    return _complete(Path(run_dir) / "checkpoints")


def _complete(ckpt_root: Path) -> list[Path]:
    return sorted(p for p in ckpt_root.glob("step_*") if ".tmp-" not in p.name and (p / WEIGHTS).is_file())


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (-> its latest complete checkpoint); either may be a
    hf://ORG/NAME[/SUBDIR][@REVISION] reference (`fastwam.hub`: fetched into, or read from, the Hugging Face cache)."""
    from fastwam import hub

    if hub.is_hub(path):
        return hub.resolve_checkpoint_dir(str(path))
    path = Path(path)
    if (path / WEIGHTS).is_file():
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    latest = root / "latest"
    if latest.is_file():
        candidate = root / latest.read_text().strip()
        if (candidate / WEIGHTS).is_file():
            return candidate
    complete = _complete(root)
    if complete:
        return complete[-1]
    raise CheckpointError(f"no checkpoint found at {path} (expected {WEIGHTS} or checkpoints/latest)")


def load_config(ckpt: str | Path) -> Config:
    ckpt = resolve_checkpoint(ckpt)
    data = _load_json(ckpt / CONFIG)
    try:
        return Config.from_dict(data)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{ckpt / CONFIG} does not describe a fastwam Config: {e}") from None


def load_weights(module: torch.nn.Module, file: str | Path, what: str = "model", assign: bool = False) -> None:
    """Strict load with an error that names missing / unexpected keys and shape mismatches.

    assign=True installs the loaded tensors as the parameters (for a module built on the meta device).
    """
    file = Path(file)
    tensors = _load_tensors(file)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    problems = []
    if missing:
        more = " ..." if len(missing) > 8 else ""
        problems.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:8])}{more}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {', '.join(unexpected[:8])}")
    if shapes:
        problems.append("shape mismatch — " + "; ".join(shapes[:8]))
    if problems:
        raise CheckpointError(f"{file} does not fit the {what} built from config.json: " + " | ".join(problems))
    module.load_state_dict(tensors, strict=True, assign=assign)


def load_norm_stats(ckpt: str | Path) -> dict | None:
    path = resolve_checkpoint(ckpt) / NORM_STATS
    return _load_json(path) if path.is_file() else None


def load_train_state(ckpt: Path, optimizer: torch.optim.Optimizer | None) -> dict:
    state_dir = ckpt / TRAIN_STATE
    if not (state_dir / "state.json").is_file():
        raise CheckpointError(f"{ckpt} has no {TRAIN_STATE}/state.json: it cannot be resumed")
    state = _load_json(state_dir / "state.json")
    if optimizer is not None and (state_dir / "optimizer.safetensors").is_file():
        optimizer_from_tensors(optimizer, _load_tensors(state_dir / "optimizer.safetensors"), state["optimizer"])
    return state
