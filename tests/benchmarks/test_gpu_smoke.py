"""benchmarks/gpu.py at its tiny size on the CPU: every figure is measured, the seeded fits repeat, no file is written."""

from __future__ import annotations

import math

from tests.benchmarks.bench_loader import load_benchmark

gpu = load_benchmark("gpu")


def test_tiny_cpu_run_measures_both_jobs_and_precisions_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu, "RESULTS_DIR", tmp_path)
    assert gpu.main(["--tiny", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    rows = [
        line.strip("|").split("|")
        for line in out.splitlines()
        if line.startswith("| teacher") or line.startswith("| student")
    ]
    throughput = {(r[0].strip(), r[1].strip()): r for r in rows if len(r) == 8}
    assert set(throughput) == {(j, p) for j in ("teacher", "student") for p in ("fp32", "bf16")}
    for row in throughput.values():
        samples_per_s, gflop = float(row[3]), float(row[6])
        assert math.isfinite(samples_per_s) and samples_per_s > 0 and gflop > 0
    repeats = [r for r in rows if len(r) == 5]
    assert [(r[0].strip(), r[3].strip()) for r in repeats] == [
        ("teacher", "yes"),
        ("student", "yes"),
    ]  # CPU, fp32
    assert list(tmp_path.iterdir()) == []  # figures are written on CUDA only
