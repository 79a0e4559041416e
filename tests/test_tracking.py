"""pkdot.tracking against a real MLflow SQLite store in tmp_path (no server)."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from pkdot.config import load_config
from pkdot.errors import StageError
from pkdot.models.heads import ModelOutput
from pkdot.tracking import PARENT_FILE, Tracker, load_student, model_config_path, resolve_tracking_uri


class TinyVideoStudent(torch.nn.Module):
    """uint8 video (B, T, H, W, 3) -> {"logits": (B, 2), "embedding": (B, 4)}, like the student."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv3d(3, 4, kernel_size=3, padding=1)
        self.head = torch.nn.Linear(4, 2)
        self.dropout = torch.nn.Dropout(0.5)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, video: torch.Tensor) -> dict[str, torch.Tensor]:
        x = video.permute(0, 4, 1, 2, 3).float() / 255.0
        embedding = self.conv(x).mean(dim=(2, 3, 4))
        return {"logits": self.head(self.dropout(embedding)), "embedding": embedding}


@dataclasses.dataclass
class StudentOutput:
    logits: torch.Tensor
    embedding: torch.Tensor


class DataclassStudent(TinyVideoStudent):
    def forward(self, video: torch.Tensor) -> StudentOutput:  # type: ignore[override]
        out = super().forward(video)
        return StudentOutput(out["logits"], out["embedding"])


class ModelOutputStudent(TinyVideoStudent):
    """Returns pkdot's ModelOutput (a registered pytree dataclass), with a nested dict and a None field."""

    def forward(self, video: torch.Tensor) -> ModelOutput:  # type: ignore[override]
        out = super().forward(video)
        return ModelOutput(
            embedding=out["embedding"],
            logits=out["logits"],
            tokens={"video": out["embedding"].unsqueeze(1)},
            gates=None,
        )


class FixedBatchStudent(TinyVideoStudent):
    """Turns the batch size into a Python int: an export would only accept that batch size."""

    def forward(self, video: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().forward(video)
        batch = int(video.shape[0])
        return {"logits": out["logits"].reshape(batch, 2), "embedding": out["embedding"]}


def _video(seed: int, batch: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(batch, 3, 8, 8, 3), dtype=np.uint8)


@pytest.fixture()
def cfg(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    return load_config(overrides={"run_dir": str(tmp_path / "run"), "tracking.experiment": "pkdot-test"})


def test_resolve_tracking_uri_order(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    c = load_config(overrides={"run_dir": str(tmp_path / "r")})
    assert resolve_tracking_uri(c) == f"sqlite:///{(tmp_path / 'r').resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_tracking_uri(c) == "http://127.0.0.1:5999"
    c2 = load_config(overrides={"run_dir": str(tmp_path / "r"), "tracking.tracking_uri": "sqlite:////x/m.db"})
    assert resolve_tracking_uri(c2) == "sqlite:////x/m.db"


def test_two_run_directories_in_one_process_keep_their_own_stores(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    a = load_config(overrides={"run_dir": str(tmp_path / "a")})
    b = load_config(overrides={"run_dir": str(tmp_path / "b")})
    ta = Tracker(a)
    assert "MLFLOW_TRACKING_URI" not in os.environ  # mlflow exports it; Tracker undoes that
    tb = Tracker(b)
    assert ta.tracking_uri != tb.tracking_uri == resolve_tracking_uri(b)
    assert ta.parent_run_id() != tb.parent_run_id()
    assert (tmp_path / "a" / "mlflow.db").is_file() and (tmp_path / "b" / "mlflow.db").is_file()


def test_parent_and_stage_runs(cfg):
    tracker = Tracker(cfg)
    parent = tracker.parent_run_id()
    run_dir = Path(cfg.run_dir).resolve()
    assert json.loads((run_dir / PARENT_FILE).read_text())["run_id"] == parent
    assert (run_dir / "mlflow.db").is_file()
    # A second Tracker (another stage/process) finds the same parent.
    assert Tracker(cfg).parent_run_id() == parent

    history = {
        "epochs": [
            {"epoch": e, "train_loss": 1.0 / e, "val_metric": 0.5 + 0.1 * e, "loss_task": 0.3}
            for e in (1, 2, 3)
        ],
        "metric": "accuracy",
        "best_epoch": 3,
    }
    with tracker.stage_run("train-teacher", fold=0, seed=1, loss="none") as sr:
        sr.log_params({"lr": 1e-3, "layers": [1, 2]})
        sr.log_params({f"many.p{i:03d}": i for i in range(250)})  # three MLflow batches of <= 100
        sr.log_metrics({"test_accuracy": 0.75}, step=2)
        tracker.log_history(sr, history)
        stage_id = sr.run_id
    with pytest.raises(RuntimeError), tracker.stage_run("distill") as failed:
        failed_id = failed.run_id
        raise RuntimeError("boom")

    client = MlflowClient(tracking_uri=resolve_tracking_uri(cfg))
    prun = client.get_run(parent)
    flat = cfg.flat()
    assert len(prun.data.params) == len(flat)
    assert prun.data.params["train.epochs_student"] == str(flat["train.epochs_student"])
    assert prun.data.params["distill.losses"] == json.dumps(flat["distill.losses"])
    assert [a.path for a in client.list_artifacts(parent)] == ["config.yaml"]
    assert client.get_experiment(prun.info.experiment_id).artifact_location.endswith("run/mlartifacts")

    srun = client.get_run(stage_id)
    assert srun.data.tags[MLFLOW_PARENT_RUN_ID] == parent
    assert srun.info.run_name == "train-teacher/fold-0/seed-1"
    assert srun.data.tags["loss"] == "none" and srun.info.status == "FINISHED"
    assert {k: srun.data.params[k] for k in ("lr", "layers")} == {"lr": "0.001", "layers": "[1, 2]"}
    assert len(srun.data.params) == 252 and srun.data.params["many.p249"] == "249"
    assert srun.data.metrics["test_accuracy"] == 0.75
    val = client.get_metric_history(stage_id, "val_metric")
    assert [(m.step, round(m.value, 6)) for m in sorted(val, key=lambda m: m.step)] == [
        (1, 0.6),
        (2, 0.7),
        (3, 0.8),
    ]
    assert len(client.get_metric_history(stage_id, "train_loss")) == 3
    assert srun.data.metrics["best_epoch"] == 3 and srun.data.tags["pkdot.val_metric"] == "accuracy"
    assert client.get_run(failed_id).info.status == "FAILED"
    assert prun.info.status == "RUNNING"
    tracker.finish_parent()
    assert client.get_run(parent).info.status == "FINISHED"
    with pytest.raises(StageError, match="status"):
        tracker.finish_parent("DONE")


def test_bad_inputs_raise_stage_errors(cfg):
    tracker = Tracker(cfg)
    with tracker.stage_run("x") as sr:
        with pytest.raises(StageError, match="metric 'acc'"):
            sr.log_metrics({"acc": "high"})
        with pytest.raises(StageError, match="epochs"):
            tracker.log_history(sr, {"metric": "accuracy"})
        with pytest.raises(StageError, match="does not exist"):
            sr.log_artifact(Path(cfg.run_dir) / "missing.txt")
    (Path(cfg.run_dir) / PARENT_FILE).write_text("not json")
    with pytest.raises(StageError, match=PARENT_FILE):
        Tracker(cfg).parent_run_id()


def test_register_champion_challenger_and_load(cfg, tmp_path):
    tracker = Tracker(cfg)
    example = _video(0, 2)
    report = tmp_path / "report.md"
    report.write_text("# report\n")
    first, second, third = TinyVideoStudent(1), TinyVideoStudent(2), TinyVideoStudent(3)

    r1 = tracker.register_student(
        first, example, metric_name="accuracy", metric_value=0.70, extra_artifacts=[report], dataset="biovid"
    )
    r2 = tracker.register_student(
        second, example, metric_name="accuracy", metric_value=0.60, dataset="biovid"
    )
    assert (r1.name, r1.alias, r1.previous_champion_version) == ("pkdot-student-biovid", "champion", None)
    assert (r2.alias, r2.previous_champion_version) == ("challenger", r1.version)

    client = MlflowClient(tracking_uri=resolve_tracking_uri(cfg))
    assert int(client.get_model_version_by_alias(r1.name, "champion").version) == r1.version
    assert int(client.get_model_version_by_alias(r1.name, "challenger").version) == r2.version
    reg_run = client.get_run(r1.run_id)
    assert reg_run.data.tags[MLFLOW_PARENT_RUN_ID] == tracker.parent_run_id()
    assert reg_run.data.metrics["accuracy"] == 0.70
    assert "extra/report.md" in [a.path for a in client.list_artifacts(r1.run_id, "extra")]

    # The champion loads back and gives the logged model's outputs, on a different batch size.
    video = torch.from_numpy(_video(5, 3))
    loaded = load_student(f"models:/{r1.name}@champion")
    first.eval()
    with torch.no_grad():
        expected, got = first(video), loaded(video)
    assert set(got) == {"logits", "embedding"}
    for key in expected:
        torch.testing.assert_close(got[key], expected[key])
    assert not torch.allclose(second.eval()(video)["logits"], got["logits"])

    r3 = tracker.register_student(third, example, metric_name="accuracy", metric_value=0.80, dataset="biovid")
    assert (r3.alias, r3.previous_champion_version) == ("champion", r1.version)
    assert int(client.get_model_version_by_alias(r1.name, "champion").version) == r3.version
    assert int(client.get_model_version_by_alias(r1.name, "challenger").version) == r2.version
    with torch.no_grad():
        torch.testing.assert_close(
            load_student(f"models:/{r1.name}@champion")(video)["logits"], third.eval()(video)["logits"]
        )


def test_register_lower_is_better_dataclass_output(cfg):
    tracker = Tracker(cfg)
    example = _video(0, 2)
    a = tracker.register_student(
        DataclassStudent(1),
        example,
        metric_name="mse",
        metric_value=0.5,
        higher_is_better=False,
        dataset="affwild2",
    )
    b = tracker.register_student(
        DataclassStudent(2),
        example,
        metric_name="mse",
        metric_value=0.4,
        higher_is_better=False,
        dataset="affwild2",
    )
    assert a.alias == "champion" and b.alias == "champion" and b.previous_champion_version == a.version
    model = DataclassStudent(2).eval()
    video = torch.from_numpy(_video(7, 2))
    with torch.no_grad():
        got = load_student(b.model_uri)(video)
        torch.testing.assert_close(got["logits"], model(video).logits)
    with pytest.raises(StageError, match="batch of at least 2"):
        tracker.register_student(model, example[:1], metric_name="mse", metric_value=0.1, dataset="affwild2")
    with pytest.raises(StageError, match="no metric 'ccc'"):
        tracker.register_student(model, example, metric_name="ccc", metric_value=0.1, dataset="affwild2")


def test_register_model_output_student_and_its_config(cfg):
    tracker = Tracker(cfg)
    student = ModelOutputStudent(4).eval()
    reg = tracker.register_student(
        student, _video(0, 4), metric_name="ccc", metric_value=0.3, dataset="affwild2"
    )
    uri = f"models:/{reg.name}@champion"
    video = torch.from_numpy(_video(9, 5))
    with torch.no_grad():
        got, expected = load_student(uri)(video), student(video)
    assert isinstance(got, ModelOutput) and got.gates is None
    torch.testing.assert_close(got.logits, expected.logits)
    torch.testing.assert_close(got.tokens["video"], expected.tokens["video"])
    logged = load_config(model_config_path(uri))
    assert logged == cfg and load_config(model_config_path(reg.model_uri)) == cfg
    with pytest.raises(StageError, match="expected models:/"):
        model_config_path("runs:/abc/student")


def test_register_refuses_a_student_with_a_fixed_batch_size(cfg):
    tracker = Tracker(cfg)
    with pytest.raises(StageError, match="dynamic batch size"):
        tracker.register_student(
            FixedBatchStudent(0), _video(0, 2), metric_name="accuracy", metric_value=0.9, dataset="biovid"
        )
    client = MlflowClient(tracking_uri=tracker.tracking_uri)
    assert client.search_registered_models() == []  # nothing registered


def test_load_student_missing_model_raises(cfg):
    Tracker(cfg)
    with pytest.raises(StageError, match="cannot load student"):
        load_student("models:/does-not-exist@champion", tracking_uri=mlflow.get_tracking_uri())


# ---- issue 14: public UI address, the version's own scores, dataset inputs, quiet store, predict -------------
def test_public_uri_is_distinct_from_the_tracking_uri(tmp_path, monkeypatch):
    from pkdot.tracking import PUBLIC_URI_ENV, resolve_public_uri, run_ui_url

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(PUBLIC_URI_ENV, raising=False)
    local = load_config(overrides={"run_dir": str(tmp_path / "r")})
    assert resolve_public_uri(local) is None  # a SQLite store has no UI to link to
    server = load_config(
        overrides={"run_dir": str(tmp_path / "r"), "tracking.tracking_uri": "http://mlflow:5000/"}
    )
    assert resolve_public_uri(server) == "http://mlflow:5000"
    monkeypatch.setenv(PUBLIC_URI_ENV, "http://localhost:5000/")
    assert resolve_public_uri(server) == "http://localhost:5000"
    assert resolve_tracking_uri(server) == "http://mlflow:5000/"  # processes still log to the service name
    assert resolve_public_uri(local) == "http://localhost:5000"
    own = load_config(
        overrides={"run_dir": str(tmp_path / "r"), "tracking.public_uri": "https://mlflow.example.org"}
    )
    assert resolve_public_uri(own) == "https://mlflow.example.org"  # the config wins over the environment
    assert run_ui_url("http://h:5000/", "abc") == "http://h:5000/#/runs/abc"
    assert run_ui_url("http://h:5000", "abc", "7") == "http://h:5000/#/experiments/7/runs/abc"


def test_registered_version_carries_its_own_scores_and_datasets(cfg):
    import pandas as pd

    from pkdot.tracking import DatasetSplit

    manifest = pd.DataFrame(
        {"sample_id": [f"s{i}" for i in range(6)], "subject_id": list("aabbcc"), "label": [0, 1] * 3}
    )
    splits = [
        DatasetSplit(
            "biovid-fold0-seed0-train", "train", manifest[manifest.subject_id != "c"], "m.parquet", "d1"
        ),
        DatasetSplit(
            "biovid-fold0-seed0-test", "test", manifest[manifest.subject_id == "c"], "m.parquet", "d2"
        ),
    ]
    tracker = Tracker(cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reg = tracker.register_student(
            TinyVideoStudent(1),
            _video(0, 2),
            metric_name="val_accuracy",
            metric_value=0.75,
            dataset="biovid",
            scores={"test_accuracy": 0.625, "test_macro_f1": 0.6, "mean_test_accuracy_over_runs": 0.7},
            datasets=splits,
        )
    # the integer `label` column: MLflow's schema hint (printed once per registered split in `make demo`) is muted
    hints = [str(w.message) for w in caught if "Inferred schema contains integer" in str(w.message)]
    assert not hints, hints
    client = MlflowClient(tracking_uri=resolve_tracking_uri(cfg))
    version = client.get_model_version(reg.name, str(reg.version))
    assert version.tags["val_accuracy"] == "0.75" and version.tags["test_accuracy"] == "0.625"
    assert version.tags["mean_test_accuracy_over_runs"] == "0.7"
    run = client.get_run(reg.run_id)
    assert run.data.metrics["val_accuracy"] == 0.75 and run.data.metrics["test_macro_f1"] == 0.6
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"biovid-fold0-seed0-train", "biovid-fold0-seed0-test"}
    assert inputs["biovid-fold0-seed0-train"].dataset.digest == "d1"
    contexts = {name: {t.key: t.value for t in d.tags}["mlflow.data.context"] for name, d in inputs.items()}
    assert contexts == {"biovid-fold0-seed0-train": "train", "biovid-fold0-seed0-test": "test"}
    assert json.loads(inputs["biovid-fold0-seed0-test"].dataset.profile)["num_rows"] == 2
    with pytest.raises(StageError, match="score 'test_accuracy'"):
        tracker.register_student(
            TinyVideoStudent(2), _video(0, 2), metric_name="val_accuracy", metric_value=0.5,
            dataset="biovid", scores={"test_accuracy": float("nan")},
        )  # fmt: skip


@pytest.mark.parametrize(("verbose", "shown"), [(False, False), (True, True)])
def test_mlflow_store_chatter_is_muted_unless_verbose(tmp_path, verbose, shown):
    import subprocess
    import sys

    code = (
        "import logging, sys\n"
        f"logging.basicConfig(level=logging.{'INFO' if verbose else 'WARNING'})\n"
        "from pkdot.config import load_config\n"
        "from pkdot.tracking import Tracker\n"
        "Tracker(load_config(overrides={'run_dir': sys.argv[1]})).parent_run_id()\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_LOGGING_LEVEL")}
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "run")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "run" / "mlflow.db").is_file()
    assert ("Creating initial MLflow database tables" in done.stderr) is shown, done.stderr[-2000:]


def _face_video(path: Path, frames: int = 12, size: int = 256) -> Path:
    """A short MP4 of the (public-domain) astronaut portrait, whose face OpenCV's cascade finds."""
    import cv2
    from skimage import data

    image = cv2.resize(cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR), (size, size))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25, (size, size))
    for _ in range(frames):
        writer.write(image)
    writer.release()
    return path


def test_predict_reads_the_given_store_and_leaves_no_stray_files(tmp_path, monkeypatch, capsys):
    from pkdot import cli

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    small = load_config(
        overrides={
            "run_dir": str(tmp_path / "run"),
            "features.n_frames": 2,
            "features.crop_size": 16,
            "features.min_face_px": 32,
        }
    )
    reg = Tracker(small).register_student(
        TinyVideoStudent(1), np.zeros((2, 2, 16, 16, 3), np.uint8), metric_name="val_accuracy",
        metric_value=0.7, dataset="biovid",
    )  # fmt: skip
    store = resolve_tracking_uri(small)
    video = _face_video(tmp_path / "face.mp4")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    # No store named: a clear error, and MLflow's default (./mlflow.db) is not created.
    assert cli.main(["predict", "--model", f"models:/{reg.name}@champion", str(video)]) == 2
    assert "--tracking-uri" in capsys.readouterr().err
    missing = f"sqlite:///{tmp_path / 'nowhere' / 'mlflow.db'}"
    assert cli.main(["predict", "--tracking-uri", missing, "--model", "models:/x@champion", str(video)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "nowhere").exists()

    code = cli.main(
        ["predict", "--tracking-uri", store, "--model", f"models:/{reg.name}@champion", str(video)]
    )
    out = capsys.readouterr()
    assert code == 0, out.err[-2000:]
    (row,) = [json.loads(line) for line in out.out.splitlines() if line.startswith("{")]
    assert row["video"] == str(video) and abs(sum(row["probabilities"].values()) - 1.0) < 1e-3
    assert sorted(p.name for p in elsewhere.iterdir()) == []  # no mlflow.db, no mlruns


def test_mlflow_run_links_on_stdout_are_off_by_default():
    """MLflow would print "View run ... at <tracking server>" per ended run (the internal address)."""
    from mlflow.environment_variables import MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT

    import pkdot.tracking  # noqa: F401 - sets the default on import

    assert MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT.get() is True
