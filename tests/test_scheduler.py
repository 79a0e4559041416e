"""The one bounded Ray scheduler (training runs and extraction shards): limit, results, progress, failures."""

from __future__ import annotations

import pytest

from pkdot.errors import FeatureError, InfrastructureError, ResourceError, StageError
from pkdot.progress import listening
from pkdot.scheduler import run_bounded


@pytest.fixture(scope="module")
def ray_up():
    import ray

    from pkdot.ray_utils import ensure_ray

    started = ensure_ray(num_cpus=2)
    yield ray
    if started:
        ray.shutdown()


def _work(x: int) -> int:
    if x == 13:
        raise ValueError("thirteen")
    if x == 99:
        raise OSError(5, "Input/output error")
    if x == 28:
        raise OSError(28, "No space left on device")
    return x * x


def test_results_progress_and_the_limit(ray_up):
    task = ray_up.remote(num_cpus=0)(_work)
    running, most = [0], [0]

    def start(x):
        running[0] += 1
        most[0] = max(most[0], running[0])
        return task.remote(x)

    def done(x, result):
        running[0] -= 1
        assert result == x * x

    seen = []
    with listening(seen.append):
        results = run_bounded(
            list(range(6)),
            start,
            limit=2,
            what="squares",
            on_result=done,
            stage="demo",
            done=1,
            weight=lambda x: 2,
        )
    assert sorted(results) == [x * x for x in range(6)]
    assert most[0] <= 2
    assert seen[0].done == 1 and seen[-1].done == seen[-1].total == 13


def test_a_failure_names_its_item_and_bad_input_is_not_infrastructure(ray_up):
    task = ray_up.remote(num_cpus=0, max_retries=0)(_work)
    with pytest.raises(
        FeatureError, match=r"(?s)extraction failed in 1 task.*shard 13: RayTaskError\(ValueError\).*thirteen"
    ):
        run_bounded(
            [13, 1, 2, 3],
            task.remote,
            limit=1,
            what="extraction",
            describe=lambda x: f"shard {x}",
            error=FeatureError,
            drain=False,
        )
    with pytest.raises(StageError, match="3 not started"):
        run_bounded([13, 1, 2, 3], task.remote, limit=1, what="training")


def test_an_infrastructure_failure_is_retried_by_the_flow(ray_up):
    task = ray_up.remote(num_cpus=0, max_retries=0)(_work)
    with pytest.raises(InfrastructureError, match="Input/output error"):
        run_bounded([99, 2], task.remote, limit=2, what="extraction", error=FeatureError)


def test_an_exhausted_resource_is_one_line_and_not_retried(ray_up):
    task = ray_up.remote(num_cpus=0, max_retries=0)(_work)
    with pytest.raises(ResourceError, match="disk full writing"):
        run_bounded([28, 2], task.remote, limit=2, what="extraction", error=FeatureError)
