"""How a stage's jobs are bundled into Ray Train runs (``train.jobs_per_run``)."""

from __future__ import annotations

import pytest

from pkdot.config import ConfigError, load_config
from pkdot.train.ray_runner import bundle_jobs


def test_a_number_bundles_in_order_and_auto_fills_the_slots_evenly():
    jobs = list(range(7))
    assert bundle_jobs(jobs, 3, limit=2) == [[0, 1, 2], [3, 4, 5], [6]]
    assert bundle_jobs(jobs, 1, limit=2) == [[j] for j in jobs]
    # auto: one run per slot that fits at once, every job in exactly one run, sizes within one of each other
    auto = bundle_jobs(jobs, "auto", limit=2)
    assert len(auto) == 2 and sorted(j for run in auto for j in run) == jobs
    assert {len(run) for run in auto} == {3, 4}
    assert bundle_jobs(jobs[:1], "auto", limit=4) == [[0]]
    assert bundle_jobs(jobs, "auto", limit=1) == [jobs]


def test_jobs_per_run_accepts_auto_and_refuses_zero(tmp_path):
    assert load_config(overrides={"train.jobs_per_run": "auto"}).train.jobs_per_run == "auto"
    with pytest.raises(ConfigError, match="jobs_per_run"):
        load_config(overrides={"train.jobs_per_run": 0})
    with pytest.raises(ConfigError, match="jobs_per_run"):
        load_config(overrides={"train.jobs_per_run": "many"})
