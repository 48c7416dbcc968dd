"""A published study that carries its data is what that data produce.

Every docs/results/*/ folder published with its evaluations (`fastwam ablate --publish`) is re-rendered from a copy
(`fastwam ablate <its recorded command> --out COPY --report-only`: no training, no evaluation) and published again;
the result must be its committed report.md, byte for byte. A hand edit of a number, or data that no longer match the
report, fails here.
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest

from fastwam.study import ablate
from fastwam.study.report import publish_report

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
STUDIES = sorted(d for d in RESULTS.iterdir() if d.is_dir() and any(d.glob("eval/**/results.json")))


def test_at_least_one_study_is_published_with_its_data():
    assert STUDIES, "no docs/results/*/eval/**/results.json"


@pytest.mark.parametrize("study", STUDIES, ids=lambda p: p.name)
def test_a_published_report_is_what_its_published_data_produce(study, tmp_path):
    copy = tmp_path / study.name
    shutil.copytree(study, copy)
    argv = shlex.split(json.loads((study / "ablation.json").read_text())["command"])[2:]
    argv[argv.index("--out") + 1] = str(copy)
    assert ablate.cli(argv + ["--report-only"]) == 0
    videos = len(list(study.glob("eval/**/videos/*.mp4")))
    again = publish_report(copy, tmp_path / "again", videos=videos)
    assert again.read_text() == (study / "report.md").read_text()
