"""`fastwam bench data` runs and reports the loader's throughput."""

from __future__ import annotations

import json

from data_helpers import LEROBOT_FIXTURE

from fastwam.bench.data import BenchDataArgs, run
from fastwam.cli import main


def test_bench_data_reports_throughput():
    res = run(BenchDataArgs(dataset=str(LEROBOT_FIXTURE), preset="tiny", batch_size=4, batches=3, warmup=1))
    assert res["clips_per_s"] > 0 and res["batched_clips_per_s"] > 0
    assert res["clips"] == 21 and res["cached"] and res["video_shape"] == [3, 3, 8, 16]


def test_bench_data_cli_json(capsys):
    assert main(["bench", "data", "--dataset", str(LEROBOT_FIXTURE), "--preset", "tiny", "--batch-size", "2",
                 "--batches", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["batch_size"] == 2 and out["episodes"] == 2
