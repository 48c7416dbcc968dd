"""`fastwam bench latency`: the JSON report's contract (not the numbers: benchmarks are not tests)."""

import json

from fastwam.bench import latency


def test_latency_report_has_every_mode_and_the_speedups(tmp_path, capsys):
    out = tmp_path / "latency.json"
    argv = ["--preset", "tiny", "--iters", "2", "--warmup", "0", "--steps", "2", "--json", "--out", str(out)]
    assert latency.cli(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert set(printed["modes"]) == {"fast", "joint", "idm"} and printed["compiled"] is False
    for stats in printed["modes"].values():
        assert 0 < stats["p50_ms"] <= stats["p90_ms"] and stats["first_call_s"] > 0
    assert set(printed["speedup_vs_fast"]) == {"joint", "idm"}
    assert printed["machine"]["device"] == "cpu" and printed["machine"]["dtype"] == "float32"


def test_compiled_latency_reports_agreement_with_eager(capsys):
    assert latency.cli(["--preset", "tiny", "--modes", "fast", "--iters", "2", "--warmup", "1", "--steps", "2",
                        "--compile", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["compiled"] == "default"  # inductor without CUDA graphs on CPU
    assert report["modes"]["fast"]["max_abs_diff_vs_eager"] <= 1e-5


def test_step_counts_are_reported_side_by_side(capsys):
    assert latency.cli(["--preset", "tiny", "--modes", "fast", "--iters", "2", "--warmup", "0",
                        "--step-counts", "1,2,4", "--rtc", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report["step_counts"]) == ["1", "2", "4"] and report["rtc_delay"] == 1
    for n, entry in report["step_counts"].items():
        assert entry["action_expert_calls"] == int(n)
        assert entry["fast"]["p50_ms"] > 0 and entry["fast_rtc"]["p50_ms"] > 0
        assert entry["fast_rtc_prefix"]["p50_ms"] > 0  # a clean prefix instead of guidance
        assert entry["speedup_vs_4_steps"] > 0
    assert report["step_counts"]["4"]["speedup_vs_4_steps"] == 1.0


def test_step_counts_are_timed_round_robin(monkeypatch, capsys):
    """One call of each step count per iteration: a slow spell of the machine falls on every count alike."""
    from fastwam.model.fastwam import FastWAM

    calls = []
    real_sample = FastWAM.sample

    def recording_sample(self, *args, steps=10, **kwargs):
        calls.append(steps)
        return real_sample(self, *args, steps=steps, **kwargs)

    monkeypatch.setattr(FastWAM, "sample", recording_sample)
    assert latency.cli(["--preset", "tiny", "--modes", "fast", "--iters", "3", "--warmup", "1", "--steps", "2",
                        "--step-counts", "1,4", "--json"]) == 0
    json.loads(capsys.readouterr().out)
    sweep_calls = calls[1 + 1 + 3:]  # after the plain mode's first call, warm-up and iterations
    assert sweep_calls == [1, 4] * (1 + 1 + 3)  # first calls, warm-up, then the timed rounds: interleaved


def test_modes_are_timed_round_robin(monkeypatch, capsys):
    """fast / joint / idm interleaved too: their speed-ups are ratios that a slow spell must not tilt."""
    from fastwam.model.fastwam import FastWAM

    calls = []
    real_sample = FastWAM.sample

    def recording_sample(self, *args, mode="fast", **kwargs):
        calls.append(mode)
        return real_sample(self, *args, mode=mode, **kwargs)

    monkeypatch.setattr(FastWAM, "sample", recording_sample)
    assert latency.cli(["--preset", "tiny", "--modes", "fast,joint", "--iters", "2", "--warmup", "1", "--steps",
                        "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["modes"]) == {"fast", "joint"}
    assert calls == ["fast", "joint"] * (1 + 1 + 2)


def test_stages_time_the_fast_paths_parts(capsys):
    assert latency.cli(["--preset", "tiny", "--modes", "fast", "--iters", "2", "--warmup", "0", "--stages",
                        "--json"]) == 0
    stages = json.loads(capsys.readouterr().out)["stages_p50_ms"]
    assert set(stages) >= {"condition", "prefill", "action_step"} and all(v > 0 for v in stages.values())
