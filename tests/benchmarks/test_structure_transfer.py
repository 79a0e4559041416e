"""The structure-transfer benchmark (benchmarks/structure_transfer.py) at a tiny size: seconds, not minutes."""

from __future__ import annotations

import pytest
import torch

from tests.benchmarks.bench_loader import load_benchmark

bench = load_benchmark("structure_transfer")
TINY = {"batch": 32, "dim": 16, "steps": 60}


@pytest.fixture(autouse=True)
def one_thread():
    """As the benchmark runs (tiny tensors: threads only add overhead); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_compare_is_one_for_the_same_structure_and_lower_for_another():
    teacher = bench.teacher_embedding(0, batch=32, dim=16)
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(1)))
    assert bench.compare(2.0 * teacher @ rotation, teacher) == pytest.approx((1.0, 1.0))
    other = torch.randn(32, 16, generator=torch.Generator().manual_seed(2))
    correlation, agreement = bench.compare(other, teacher)
    assert -1.0 <= correlation < 0.5 and 0.0 <= agreement < 0.5


def test_identity_aligned_loss_transfers_more_structure_than_least_anchors():
    settings = dict(bench.SETTINGS)
    least = bench.optimise("least", settings["pkdot, k = 30 least (paper)"], 0, **TINY)
    sp = bench.optimise("sp", settings["SP (identity-aligned)"], 0, **TINY)
    for outcome in (least, sp):
        assert -1.0 <= outcome.correlation <= 1.0 and 0.0 <= outcome.nn_agreement <= 1.0
        assert outcome.loss >= -1e-6 and outcome.seconds > 0
    assert sp.correlation > least.correlation
    # same seed, same start: reproducible
    again = bench.optimise("least", settings["pkdot, k = 30 least (paper)"], 0, **TINY)
    assert again.correlation == pytest.approx(least.correlation, abs=1e-6)


def test_markdown_has_one_row_per_setting(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "SEEDS", (0, 1))
    monkeypatch.setattr(bench, "BATCH", 24)
    monkeypatch.setattr(bench, "DIM", 8)
    out = bench.main(["--steps", "3", "--out", str(tmp_path / "st.md")])
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and " % |" in line]
    assert len(rows) == len(bench.SETTINGS) and all(line.count("|") == 6 for line in rows)
    assert "python benchmarks/structure_transfer.py --steps 3" in text and "distribution" in text
