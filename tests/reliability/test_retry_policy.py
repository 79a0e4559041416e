"""Case 8 of issue 11: infrastructure failures are retried by the flow, bad input is not.

A Ray worker crash or out-of-memory kill during extraction surfaces as :class:`InfrastructureError` (retried),
not as a :class:`FeatureError` (never retried).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import ray.exceptions as rex
from prefect.states import Failed

from flows.pipeline import retry_on_infrastructure_error
from pkdot.errors import ConfigError, DatasetError, FeatureError, InfrastructureError, StageError
from pkdot.ray_utils import is_infrastructure_error

INFRASTRUCTURE = [
    rex.WorkerCrashedError(),
    rex.OutOfMemoryError("task killed: node memory over 95%"),
    rex.ObjectStoreFullError("object store full"),
    rex.NodeDiedError("node died"),
    rex.ActorDiedError(),
    rex.LocalRayletDiedError(),
    OSError(
        5, "Input/output error"
    ),  # (a full disk is a resource error, never retried: test_resource_errors)
    ConnectionResetError(),
    InfrastructureError("extraction of video shard 3: Ray infrastructure failure (WorkerCrashedError)"),
]
BAD_INPUT = [
    FeatureError("biosignal file x.csv: line 3, column 'gsr': 'abc' is not a number"),
    DatasetError("samples.csv: line 4: class_id 'x' is not a number"),
    ConfigError("features.n_frames: must be >= 1"),
    StageError("stage 'extract' did not complete: re-run `pkdot extract`"),
    ValueError("a bug fails the same way again"),
]


def _should_retry(exc: BaseException) -> bool:
    return retry_on_infrastructure_error(None, type("TaskRun", (), {"name": "extract-0"})(), Failed(data=exc))


@pytest.mark.parametrize("exc", INFRASTRUCTURE, ids=lambda e: type(e).__name__)
def test_the_flow_retries_infrastructure_failures(exc: BaseException) -> None:
    assert is_infrastructure_error(exc)
    assert _should_retry(exc)


@pytest.mark.parametrize("exc", BAD_INPUT, ids=lambda e: type(e).__name__)
def test_the_flow_does_not_retry_bad_input(exc: BaseException) -> None:
    assert not is_infrastructure_error(exc)
    assert not _should_retry(exc)


def test_a_task_error_is_infrastructure_only_when_its_cause_is() -> None:
    io_error = rex.RayTaskError("extract_shard", "traceback", OSError(5, "Input/output error"))
    disk_full = rex.RayTaskError("extract_shard", "traceback", OSError(28, "No space left on device"))
    bad_value = rex.RayTaskError("extract_shard", "traceback", ValueError("bad"))
    assert is_infrastructure_error(io_error.as_instanceof_cause())
    assert not is_infrastructure_error(disk_full.as_instanceof_cause())  # a retry cannot free the disk
    assert not is_infrastructure_error(bad_value.as_instanceof_cause())


@pytest.mark.integration
def test_a_worker_crash_during_extraction_is_retried_not_a_feature_error(
    tiny_biovid: Path, tmp_path: Path, monkeypatch
) -> None:
    """A real Ray worker dies (os._exit) while extracting a shard: InfrastructureError, which the flow retries."""
    import ray

    from pkdot.config import load_config
    from pkdot.data.manifest import read_manifest
    from pkdot.features import extract as extract_module
    from pkdot.pipeline import prepare_run, run_stage
    from tests.reliability.conftest import tiny_overrides

    cfg = prepare_run(
        load_config(
            preset="demo", overrides=tiny_overrides(tiny_biovid, tmp_path / "run", **{"features.workers": 2})
        )
    )
    run_stage("manifest", cfg)

    def crash(job, features):  # pickled by value: runs in the worker, and kills it
        os._exit(1)

    monkeypatch.setattr(extract_module, "extract_shard", crash)
    try:
        with pytest.raises(InfrastructureError, match="WorkerCrashedError") as info:
            extract_module.run_extract(
                cfg, read_manifest(tmp_path / "run" / "manifest.parquet"), tmp_path / "run"
            )
    finally:
        if ray.is_initialized():
            ray.shutdown()
    assert not isinstance(info.value, FeatureError)
    assert isinstance(info.value.__cause__, rex.WorkerCrashedError)
    assert _should_retry(info.value)
