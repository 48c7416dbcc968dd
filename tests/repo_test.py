"""The repository itself: nothing tracked is ignored, and the only binaries are small fixtures and result media."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_BINARY_BYTES = 1_000_000  # a test fixture or a picture / clip a results report shows
BINARY_HOMES = ("tests/fixtures/", "docs/")


def _git(*args: str) -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if line]


def test_no_tracked_file_is_ignored():
    assert _git("ls-files", "-ci", "--exclude-standard") == []


def test_tracked_binaries_are_small_fixtures_or_result_media():
    wrong = []
    for name in _git("ls-files"):
        path = ROOT / name
        if not path.is_file():  # deleted in the working tree
            continue
        with path.open("rb") as f:
            binary = b"\0" in f.read(8192)
        if name.endswith((".whl", ".zip", ".tar.gz", ".tgz")) or (binary and (
                not name.startswith(BINARY_HOMES) or path.stat().st_size > MAX_BINARY_BYTES)):
            wrong.append(f"{name} ({path.stat().st_size} bytes)")
    assert not wrong, "binaries outside tests/fixtures/ and docs/, over 1 MB, or packages: " + ", ".join(wrong)
