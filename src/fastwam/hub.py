"""Checkpoints on the Hugging Face Hub: `hf://ORG/NAME[/SUBDIR][@REVISION]` wherever a checkpoint path is accepted.

`fastwam serve --checkpoint hf://org/policy`, `fastwam eval metaworld --checkpoint hf://org/policy@v1.0`,
`fastwam.load_model("hf://org/runs/fast_s0")`, `FastWAMPolicy.from_pretrained("hf://org/policy")`, `fastwam train
--init-from hf://org/prior`, `fastwam import official --checkpoint hf://org/repo/model.pt` and `fastwam import lerobot
--policy hf://org/policy` resolve the reference through `huggingface_hub`: files come from its cache (`HF_HOME`,
`HF_HUB_CACHE`), a revision (branch, tag or commit) is pinned with `@REVISION`, and only the files needed are fetched:
a fastwam checkpoint's config.json, weights and norm_stats.json (never its optimiser state); for a run directory, its
`checkpoints/latest` first and then that checkpoint's files. `HF_HUB_OFFLINE=1` is honoured: nothing is downloaded,
and a reference the cache does not hold is one line saying so. Writing `hf://` is the permission to download; a plain
path never touches the network.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fastwam.errors import UserError

PREFIX = "hf://"
# What a policy needs of a fastwam checkpoint directory (train_state/ is only for resuming training).
CHECKPOINT_FILES = ("config.json", "model.safetensors", "model_ema.safetensors", "norm_stats.json")


class HubError(UserError):
    """A hf:// reference that cannot be resolved (offline and not cached, no such repository / file / revision)."""


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    path: str = ""  # inside the repository ("" = its root)
    revision: str | None = None

    def __str__(self) -> str:
        return PREFIX + self.repo_id + (f"/{self.path}" if self.path else "") + (f"@{self.revision}" if self.revision
                                                                                else "")


def is_hub(spec: object) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def parse(spec: str) -> HubRef:
    """"hf://org/name/sub/dir@rev" -> HubRef("org/name", "sub/dir", "rev")."""
    if not is_hub(spec):
        raise HubError(f"{spec!r} is not a hf://ORG/NAME[/SUBDIR][@REVISION] reference")
    body = spec[len(PREFIX):]
    revision = None
    if "@" in body:
        body, revision = body.rsplit("@", 1)
        if not revision:
            raise HubError(f"{spec}: empty revision after '@'")
    parts = [p for p in body.split("/") if p]
    if len(parts) < 2:
        raise HubError(f"{spec}: expected hf://ORG/NAME[/SUBDIR][@REVISION]")
    return HubRef("/".join(parts[:2]), "/".join(parts[2:]), revision)


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _download(ref: HubRef, filename: str, required: bool = True) -> Path | None:
    """One file of the repository (from the cache, else the Hub unless offline); None if absent and not required."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(ref.repo_id, filename, revision=ref.revision, cache_dir=_cache_from_env(),
                                    local_files_only=_offline()))
    except Exception as e:  # noqa: BLE001 - huggingface_hub raises many types (offline, 404, auth, network)
        kind = type(e).__name__
        missing = kind in ("EntryNotFoundError", "RemoteEntryNotFoundError") or (
            kind == "LocalEntryNotFoundError" and not _offline() and "connection" not in str(e).lower())
        if not required and (missing or (kind == "LocalEntryNotFoundError" and _offline())):
            return None
        raise HubError(_explain(ref, filename, e)) from None


def _explain(ref: HubRef, filename: str, e: Exception) -> str:
    kind = type(e).__name__
    where = f"{PREFIX}{ref.repo_id}/{filename}" + (f"@{ref.revision}" if ref.revision else "")
    if kind == "LocalEntryNotFoundError" or "offline" in kind.lower():
        if _offline():
            return (f"{where}: not in the Hugging Face cache ({_cache_dir()}) and HF_HUB_OFFLINE=1 forbids "
                    f"downloading it; fetch it on a connected machine (huggingface-cli download {ref.repo_id}"
                    f"{' --revision ' + ref.revision if ref.revision else ''}) into that cache, or unset "
                    "HF_HUB_OFFLINE")
        return f"{where}: not in the Hugging Face cache and the Hub could not be reached ({kind})"
    if kind in ("RepositoryNotFoundError", "GatedRepoError"):
        return f"{PREFIX}{ref.repo_id}: no such repository, or it needs a login (huggingface-cli login) ({kind})"
    if kind == "RevisionNotFoundError":
        return f"{PREFIX}{ref.repo_id}@{ref.revision}: no such revision"
    if kind in ("EntryNotFoundError", "RemoteEntryNotFoundError"):
        return f"{where}: no such file in the repository"
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{where}: {kind}: {first}"


def _cache_from_env() -> str | None:
    """The cache the environment names now (huggingface_hub reads it once, when first imported)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def _cache_dir() -> str:
    found = _cache_from_env()
    if found:
        return found
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except Exception:  # noqa: BLE001
        return "the Hugging Face cache"


def resolve_checkpoint_dir(spec: str) -> Path:
    """A hf:// fastwam checkpoint or run directory -> the local (cached) checkpoint directory, fetching only the files
    a policy needs."""
    ref = parse(spec)
    config = _download(ref, _join(ref.path, "config.json"), required=False)
    weights = _download(ref, _join(ref.path, "model.safetensors"), required=False) if config else None
    if config is None or weights is None:
        latest = _download(ref, _join(ref.path, "checkpoints", "latest"), required=False)
        if latest is None:
            raise HubError(f"{ref}: neither a fastwam checkpoint (config.json + model.safetensors) nor a run directory "
                           "(checkpoints/latest) there" + (" in the cache (HF_HUB_OFFLINE=1)" if _offline() else ""))
        step = latest.read_text().strip()
        ref = HubRef(ref.repo_id, _join(ref.path, "checkpoints", step), ref.revision)
        config = _download(ref, _join(ref.path, "config.json"))
        weights = _download(ref, _join(ref.path, "model.safetensors"))
    for name in CHECKPOINT_FILES[2:]:
        _download(ref, _join(ref.path, name), required=False)
    return weights.parent


def resolve_file(spec: str) -> Path:
    """A hf:// reference to one file -> its local (cached) path."""
    ref = parse(spec)
    if not ref.path:
        raise HubError(f"{spec}: name a file inside the repository (hf://ORG/NAME/PATH/TO/FILE)")
    return _download(ref, ref.path)


def resolve_folder(spec: str) -> Path:
    """A hf:// folder (its files, not its sub-folders) -> the local (cached) folder."""
    from huggingface_hub import snapshot_download

    ref = parse(spec)
    pattern = _join(ref.path, "*") if ref.path else "*"
    try:
        root = Path(snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=[pattern],
                                      cache_dir=_cache_from_env(), local_files_only=_offline()))
    except Exception as e:  # noqa: BLE001
        raise HubError(_explain(ref, pattern, e)) from None
    folder = root / ref.path if ref.path else root
    if not folder.is_dir() or not any(folder.iterdir()):
        raise HubError(f"{spec}: no files there" + (" in the cache (HF_HUB_OFFLINE=1)" if _offline() else ""))
    return folder


def local_checkpoint(path: str | os.PathLike) -> str | os.PathLike:
    """`path` itself, or for a hf:// reference its local checkpoint directory."""
    return resolve_checkpoint_dir(path) if is_hub(path) else path


def local_file(path: str | os.PathLike) -> str | os.PathLike:
    return resolve_file(path) if is_hub(path) else path


def local_folder(path: str | os.PathLike) -> str | os.PathLike:
    return resolve_folder(path) if is_hub(path) else path
