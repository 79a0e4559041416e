"""The console: WARNING+ and status lines by default, INFO with -v, everything in <run>/logs/pkdot.log; epoch
records from workers logged once; one progress line per stage; Ray's worker output routed to logging; and a
tiny ``pkdot run`` whose console is short, has no line twice, and whose epoch lines are in the log file."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pkdot import console
from pkdot.console import (
    EpochTail,
    StageProgressDisplay,
    console_session,
    describe_record,
    epoch_file,
    epoch_recorder,
    route_ray_worker_logs,
)
from pkdot.progress import listening, report

REPO = Path(__file__).resolve().parents[1]


def test_default_console_shows_warnings_and_status_log_file_gets_info(tmp_path, capsys):
    with console_session(verbose=False, run_dir=tmp_path) as log_path:
        logging.getLogger("pkdot.train").info("an info line")
        logging.getLogger("pkdot.train").warning("a warning line")
        logging.getLogger(console.STATUS_LOGGER).info("stage x done")
        # another library's INFO (not MLflow's: once imported, MLflow prints through its own handler, which
        # pkdot.tracking mutes for its store loggers -- tests/test_tracking.py)
        logging.getLogger("somelib.store").info("Creating initial tables")
        logging.getLogger("somelib").warning("a library warning")
    err = capsys.readouterr().err
    assert "a warning line" in err and "stage x done" in err and "a library warning" in err
    assert "an info line" not in err and "Creating initial" not in err
    text = log_path.read_text()
    assert log_path == tmp_path / "logs" / "pkdot.log"
    assert "an info line" in text and "a warning line" in text and "stage x done" in text
    assert "Creating initial" not in text  # other libraries' INFO is chatter, also in the file
    # the session removed its handlers: nothing more reaches the file
    logging.getLogger("pkdot.train").warning("after the session")
    assert "after the session" not in log_path.read_text()


def test_a_prefect_console_handler_installed_earlier_is_set_aside_for_the_session(tmp_path, capsys):
    """Prefect imported before the session (a notebook, an earlier flow in the process) leaves its console
    handler on the root logger; the session prints each record once, at its own threshold, and puts it back."""
    from prefect.logging.handlers import PrefectConsoleHandler

    root = logging.getLogger()
    prefect_handler = PrefectConsoleHandler(level=logging.INFO)
    root.addHandler(prefect_handler)
    try:
        with console_session(verbose=False, run_dir=tmp_path):
            assert prefect_handler not in root.handlers
            logging.getLogger("pkdot.train").info("an info line")
            logging.getLogger("pkdot.train").warning("a warning line")
        err = capsys.readouterr().err
        assert "an info line" not in err
        assert err.count("a warning line") == 1
        assert prefect_handler in root.handlers  # restored after the session
    finally:
        root.removeHandler(prefect_handler)


def test_verbose_console_shows_info(tmp_path, capsys):
    with console_session(verbose=True, run_dir=tmp_path):
        logging.getLogger("pkdot.epochs").info("[job] teacher epoch 1: loss=1")
    assert "[job] teacher epoch 1: loss=1" in capsys.readouterr().err


def test_each_epoch_record_is_logged_once_and_old_ones_not_again(tmp_path, caplog):
    job = "student/pkdot/fold-0/seed-0"
    record = epoch_recorder(tmp_path, job)
    record("student", 1, {"loss": 2.0, "val_accuracy": 0.5})  # an earlier attempt: not logged again
    tail = EpochTail(tmp_path, [job])
    record("student", 2, {"loss": 1.5, "val_accuracy": 0.625})
    with open(epoch_file(tmp_path, job), "a") as f:
        f.write('{"job": "student/pkdot/fold-0/seed-0", "phase": "student", "ep')  # being written
    with caplog.at_level(logging.INFO, logger="pkdot.epochs"):
        newest = tail.poll()
        assert tail.poll() is None  # nothing new, the half line waits
        with open(epoch_file(tmp_path, job), "a") as f:
            f.write('och": 3, "loss": 1.25}\n')
        third = tail.poll([job])
    lines = [r.getMessage() for r in caplog.records if r.name == "pkdot.epochs"]
    assert lines == [
        f"[{job}] student epoch 2: loss=1.5 val_accuracy=0.625",
        f"[{job}] student epoch 3: loss=1.25",
    ]
    assert newest["epoch"] == 2 and third["epoch"] == 3
    assert describe_record(newest) == "student-pkdot-fold-0-seed-0 student ep 2 val_accuracy=0.625"


def test_one_progress_line_per_stage_when_not_a_terminal():
    out = io.StringIO()
    display = StageProgressDisplay(file=out)
    with listening(display):
        report("extract", 1, 4, "shards")  # extract draws its own bar
        report("train-teacher", 0, 3, "jobs")
        report("train-teacher", 1, 3, "jobs", "teacher-fold-0-seed-0 teacher ep 6 val_accuracy=0.812")
        report("train-teacher", 3, 3, "jobs")
        report("distill", 0, 2, "jobs")
        report("distill", 1, 2, "jobs", "student-none-fold-1-seed-0 student ep 2 val_accuracy=0.700")
    display.close()  # an interrupted stage still ends its display
    lines = [line for line in out.getvalue().splitlines() if line.strip()]
    assert len(lines) == 2, lines
    assert lines[0].startswith("train-teacher") and "3/3 jobs" in lines[0]
    assert "val_accuracy=0.812" in lines[0]
    assert lines[1].startswith("distill") and "1/2 jobs" in lines[1] and "val_accuracy=0.700" in lines[1]
    assert "extract" not in out.getvalue()


def test_ray_worker_lines_go_to_logging_only_in_a_session(tmp_path, caplog):
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    printed: list[dict] = []
    dispatcher.add_handler("ray_print_logs", printed.append)  # what ray.init(log_to_driver=True) installs
    try:
        assert route_ray_worker_logs() is False  # outside a session Ray prints as usual
        with console_session(run_dir=tmp_path), caplog.at_level(logging.INFO, logger="pkdot.ray_workers"):
            assert route_ray_worker_logs() is True
            dispatcher.emit(
                {
                    "pid": 7,
                    "actor_name": "TrainController",
                    "lines": ["Requesting resources", "2026-12-02 10:00:00,1\tWARNING x.py:3 -- disk low"],
                    "is_err": True,
                }
            )
            dispatcher.emit({"pid": "raylet", "lines": ["A worker died"], "is_err": True})
            # a stage shuts its Ray down (Ray removes its printer) and the next stage starts another one
            dispatcher.remove_handler("ray_print_logs")
            dispatcher.add_handler("ray_print_logs", printed.append)
            assert route_ray_worker_logs() is True
            dispatcher.emit({"pid": 8, "lines": ["second Ray"], "is_err": False})
        assert printed == []
        levels = {r.getMessage(): r.levelno for r in caplog.records if r.name == "pkdot.ray_workers"}
        assert levels == {
            "(TrainController pid=7) Requesting resources": logging.INFO,
            "(TrainController pid=7) 2026-12-02 10:00:00,1\tWARNING x.py:3 -- disk low": logging.WARNING,
            "(pid=raylet) A worker died": logging.WARNING,
            "(pid=8) second Ray": logging.INFO,
        }
        assert [name for name, _ in dispatcher.handlers].count("pkdot_worker_logs") == 0
        assert "pkdot_worker_logs" not in [name for name, _ in dispatcher.handlers]
    finally:
        dispatcher.remove_handler("ray_print_logs")


# ---- a whole tiny run ------------------------------------------------------------------------------------------
TINY = [
    "model.embed_dim=16",
    "model.mlp_hidden=16",
    "model.fusion_heads=2",
    "model.tnet_hidden=[8]",
    "train.folds=3",
    "train.max_folds=1",
    "train.batch_size=32",
    "train.teacher_batch_size=32",
    "train.epochs_unimodal=2",
    "train.epochs_teacher=2",
    "train.epochs_tnet=2",
    "train.epochs_student=2",
    "train.num_workers=0",  # Ray Train's local mode (the demo's): no worker group to start
    "train.jobs_per_run=2",  # both students in one Ray Train run
    "distill.losses=[none, pkdot]",
    "distill.pkdot.k=4",
    "tracking.register_model=false",
    "train.refit=false",  # (the refit stage: tests/test_stages.py, tests/integration/servers/test_deployment.py)
    "tracking.log_checkpoints=false",
    "features.workers=1",
]


def _table(path: Path) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for s in range(6):
        for i in range(20):
            y = i % 2
            rows.append(
                {
                    "sample_id": f"p{s}-{i}",
                    "subject_id": f"p{s}",
                    "label": y,
                    "a": (y + 0.3 * rng.normal(size=6)).tolist(),
                    "b": (y + 0.3 * rng.normal(size=4)).tolist(),
                }
            )
    pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.mark.integration
def test_a_tiny_run_prints_few_lines_none_twice_and_logs_the_epochs(tmp_path):
    table = _table(tmp_path / "t.parquet")
    run_dir = tmp_path / "run"
    argv = [sys.executable, "-m", "pkdot.cli", "run", "--dataset", "table", "--root", str(table)]
    argv += ["--student-modalities", "a", "--privileged-modalities", "b", "--run-dir", str(run_dir)]
    for item in TINY:
        argv += ["--set", item]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env |= {
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(REPO),
    }
    done = subprocess.run(
        argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900
    )
    output = done.stdout
    assert done.returncode == 0, output[-4000:]
    lines = [line.rstrip() for line in output.splitlines() if line.strip()]
    repeated = {line: n for line, n in Counter(lines).items() if n > 1}
    assert not repeated, f"lines printed more than once: {repeated}\n{output}"
    assert len(lines) < 40, output
    assert "epoch" not in output.lower(), output  # epoch lines only in the log file (and MLflow)
    assert any(line.startswith("train-teacher") and "jobs" in line for line in lines), output
    assert any(line.startswith("distill") and "2/2 jobs" in line for line in lines), output
    log = (run_dir / "logs" / "pkdot.log").read_text()
    epoch_lines = [line for line in log.splitlines() if "pkdot.epochs:" in line]
    # teacher job: unimodal (2 epochs per modality) + teacher 2 + T-Net 2; 2 students x 2 epochs
    assert len([line for line in epoch_lines if "[student/" in line]) == 4, log
    assert len([line for line in epoch_lines if "[teacher/" in line]) >= 6, log
    assert len(epoch_lines) == len(set(epoch_lines)), "an epoch line logged twice"
    files = [
        *(run_dir / "logs" / "epochs").glob("*.jsonl"),
        *(run_dir / "refit" / "logs" / "epochs").glob("*.jsonl"),
    ]
    records = [json.loads(x) for f in files for x in f.open()]
    assert len(records) == len(epoch_lines)
