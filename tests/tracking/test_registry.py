"""pkdot.tracking.registry against a real MLflow SQLite store in tmp_path (no server)."""

from __future__ import annotations

import dataclasses
import json
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
from pkdot.tracking.registry import load_student, model_config_path, register_student
from pkdot.tracking.runs import Tracker, resolve_tracking_uri


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


def test_register_champion_challenger_and_load(cfg):
    tracker = Tracker(cfg)
    example = _video(0, 2)
    first, second, third = TinyVideoStudent(1), TinyVideoStudent(2), TinyVideoStudent(3)

    r1 = register_student(
        tracker, first, example, metric_name="accuracy", metric_value=0.70, dataset="biovid"
    )
    r2 = register_student(
        tracker, second, example, metric_name="accuracy", metric_value=0.60, dataset="biovid"
    )
    assert (r1.name, r1.alias, r1.previous_champion_version) == ("pkdot-student-biovid", "champion", None)
    assert (r2.alias, r2.previous_champion_version) == ("challenger", r1.version)

    client = MlflowClient(tracking_uri=resolve_tracking_uri(cfg))
    assert int(client.get_model_version_by_alias(r1.name, "champion").version) == r1.version
    assert int(client.get_model_version_by_alias(r1.name, "challenger").version) == r2.version
    reg_run = client.get_run(r1.run_id)
    assert reg_run.data.tags[MLFLOW_PARENT_RUN_ID] == tracker.parent_run_id()
    assert reg_run.data.metrics["accuracy"] == 0.70
    assert "config.yaml" in [a.path for a in client.list_artifacts(r1.run_id)]

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

    r3 = register_student(
        tracker, third, example, metric_name="accuracy", metric_value=0.80, dataset="biovid"
    )
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
    a = register_student(
        tracker,
        DataclassStudent(1),
        example,
        metric_name="mse",
        metric_value=0.5,
        higher_is_better=False,
        dataset="affwild2",
    )
    b = register_student(
        tracker,
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
        got = load_student(f"models:/{b.name}/{b.version}")(video)
        torch.testing.assert_close(got["logits"], model(video).logits)
    with pytest.raises(StageError, match="batch of at least 2"):
        register_student(tracker, model, example[:1], metric_name="mse", metric_value=0.1, dataset="affwild2")
    with pytest.raises(StageError, match="no metric 'ccc'"):
        register_student(tracker, model, example, metric_name="ccc", metric_value=0.1, dataset="affwild2")


def test_register_model_output_student_and_its_config(cfg):
    tracker = Tracker(cfg)
    student = ModelOutputStudent(4).eval()
    reg = register_student(
        tracker, student, _video(0, 4), metric_name="ccc", metric_value=0.3, dataset="affwild2"
    )
    uri = f"models:/{reg.name}@champion"
    video = torch.from_numpy(_video(9, 5))
    with torch.no_grad():
        got, expected = load_student(uri)(video), student(video)
    assert isinstance(got, ModelOutput) and got.gates is None
    torch.testing.assert_close(got.logits, expected.logits)
    torch.testing.assert_close(got.tokens["video"], expected.tokens["video"])
    logged = load_config(model_config_path(uri))
    assert logged == cfg and load_config(model_config_path(f"models:/{reg.name}/{reg.version}")) == cfg
    with pytest.raises(StageError, match="expected models:/"):
        model_config_path("runs:/abc/student")


def test_register_refuses_a_student_with_a_fixed_batch_size(cfg):
    tracker = Tracker(cfg)
    with pytest.raises(StageError, match="dynamic batch size"):
        register_student(
            tracker,
            FixedBatchStudent(0),
            _video(0, 2),
            metric_name="accuracy",
            metric_value=0.9,
            dataset="biovid",
        )
    client = MlflowClient(tracking_uri=tracker.tracking_uri)
    assert client.search_registered_models() == []  # nothing registered


def test_load_student_missing_model_raises(cfg):
    Tracker(cfg)
    with pytest.raises(StageError, match="cannot load student"):
        load_student("models:/does-not-exist@champion", tracking_uri=mlflow.get_tracking_uri())


def test_registered_version_carries_its_own_scores_and_datasets(cfg):
    import pandas as pd

    from pkdot.tracking.registry import DatasetSplit

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
        reg = register_student(
            tracker,
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
        register_student(
            tracker,
            TinyVideoStudent(2), _video(0, 2), metric_name="val_accuracy", metric_value=0.5,
            dataset="biovid", scores={"test_accuracy": float("nan")},
        )  # fmt: skip


def _face_video(path: Path, frames: int = 12, size: int = 256) -> Path:
    """A short MP4 of the (public-domain) astronaut portrait, whose face OpenCV's cascade finds, panning."""
    import cv2
    from skimage import data

    image = cv2.resize(cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR), (size, size))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25, (size, size))
    for i in range(frames):  # moving a little: pkdot refuses a frozen video
        writer.write(np.roll(image, 2 * i, axis=1))
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
    reg = register_student(
        Tracker(small),
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


def _run_results(test_gain: float, val_gain: float):
    """Per-run tables of students `none` and `pkdot` (2 folds x 2 seeds): pkdot is better on test by
    ``test_gain`` and on validation by ``val_gain`` (negative: worse)."""
    import types

    import pandas as pd

    from pkdot.evaluate.aggregate import select_student, summary_table

    rows = []
    for fold in (0, 1):
        for seed in (0, 1):
            base = 0.6 + 0.02 * fold + 0.01 * seed
            for loss, test, val in (
                ("none", base, base + 0.1),
                ("pkdot", base + test_gain, base + 0.1 + val_gain),
            ):
                rows.append(
                    {"model": f"student-{loss}", "fold": fold, "seed": seed, "n_samples": 10}
                    | {"accuracy": test, "macro_f1": test, "val_accuracy": val}
                )
    per_fold = pd.DataFrame(rows)
    table = summary_table(per_fold, regression=False, test_train_ratio=0.25)
    selection = select_student(per_fold, "accuracy", ["none", "kd", "pkdot"])
    protocol = "subject 3-fold cross-validation (3 folds evaluated)"
    return types.SimpleNamespace(selection=selection, table=table, per_fold=per_fold, protocol=protocol)


def _register_best(cfg, summary, **kw):
    import pandas as pd

    from pkdot.tracking.registry import register_best

    manifest = pd.DataFrame({"sample_id": [f"s{i}" for i in range(8)], "subject_id": list("aabbccdd")})
    subjects = {"train": ["a", "b"], "val": ["c"], "test": ["d"]}
    return register_best(
        cfg, summary, TinyVideoStudent(1), (3, 8, 8, 3), manifest=manifest, subjects=subjects, **kw
    )


def test_registered_loss_is_chosen_on_validation_and_described_by_its_card(cfg):
    """Issue 22: best test mean (pkdot) and best validation mean (none) differ; `none` is registered, with a
    model card (protocol, CV estimate and interval, subjects, code) as description and tags."""
    summary = _run_results(test_gain=0.05, val_gain=-0.03)
    table = summary.table.set_index("model")
    assert table.loc["student-pkdot", "mean"] > table.loc["student-none", "mean"]
    details = _register_best(cfg, summary, manifest_fingerprint="fp")
    assert details["registered_loss"] == "none" and details["alias"] == "champion"

    client = MlflowClient(tracking_uri=resolve_tracking_uri(cfg))
    version = client.get_model_version_by_alias(details["model_name"], "champion")
    card, tags = version.description, version.tags
    none = table.loc["student-none"]
    assert (
        tags["pkdot.loss"] == "none" and tags["pkdot.dataset"] == "biovid" and tags["pkdot.task"] == "binary"
    )
    assert tags["pkdot.training_subjects"] == "2" and tags["pkdot.config_hash"] == cfg.section_hash()
    assert tags["pkdot.cv_estimate"] == f"{none['mean']:.4f} [{none['ci_low']:.4f}, {none['ci_high']:.4f}]"
    assert "validation" in tags["pkdot.selection_rule"] and tags["pkdot.alias"] == "champion"
    for text in (
        "subject 3-fold cross-validation",
        "highest mean validation accuracy",
        f"{none['mean']:.4f}, corrected 95% CI [{none['ci_low']:.4f}, {none['ci_high']:.4f}] over 4",
        "2 subjects: fold",
        "uint8 array (batch, 3, 8, 8, 3)",
        "logits over 2 classes",
        "`champion`: the first version",
        "pkdot ",
    ):
        assert text in card, (text, card)
    run = client.get_run(version.run_id)
    assert run.data.metrics["cv_accuracy"] == pytest.approx(none["mean"])
    assert run.data.metrics["val_accuracy"] == pytest.approx(summary.selection.val_mean + 0.0, abs=0.05)
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == {
        f"biovid-fold{details['registered_fold']}-seed{details['registered_seed']}-{s}"
        for s in ("train", "val", "test")
    }


def test_champion_moves_only_when_the_cv_estimate_beats_it(cfg, tmp_path):
    first = _register_best(cfg, _run_results(test_gain=0.0, val_gain=0.05))  # pkdot, CV mean ~0.625
    worse = _register_best(cfg, _run_results(test_gain=-0.1, val_gain=0.05))  # pkdot again, lower CV estimate
    refit = _register_best(cfg, _run_results(test_gain=0.1, val_gain=0.05), trained_on="all subjects (refit)")
    assert [first["alias"], worse["alias"], refit["alias"]] == ["champion", "challenger", "champion"]
    client = MlflowClient(tracking_uri=resolve_tracking_uri(cfg))
    name = first["model_name"]
    loser = client.get_model_version(name, worse["model_version"])
    assert (
        "`challenger`: its cv_accuracy" in loser.description
        and "does not beat champion v1" in loser.description
    )
    assert "beats the current champion's" in loser.description  # the rule itself
    assert (
        client.get_model_version(name, refit["model_version"])
        .tags["pkdot.trained_on"]
        .startswith("all subjects")
    )
    # another task under the same name is not compared: challenger, and the card says why
    other = load_config(
        overrides={"run_dir": cfg.run_dir, "tracking.experiment": "pkdot-test", "data.task": "multiclass"}
    )
    summary = _run_results(test_gain=0.3, val_gain=0.05)
    assert _register_best(other, summary)["alias"] == "challenger"
    last = client.get_model_version_by_alias(name, "challenger")
    assert "another task" in last.description and last.tags["pkdot.task"] == "multiclass"


def test_dataset_splits_follow_the_fold_unit_clip_folds_log_their_clips(cfg):
    """Under ``train.folds: clips`` a fold lists sample ids: the logged dataset frames are those clips, not empty."""
    import pandas as pd

    from pkdot.tracking.registry import dataset_splits

    manifest = pd.DataFrame(
        {"subject_id": ["a", "a", "b", "b"], "sample_id": ["a1", "a2", "b1", "b2"], "label": [0, 1, 0, 1]}
    )
    by_subject = dataset_splits(cfg, manifest, {"train": ["a"], "test": ["b"]}, "fold0-seed0", "fp")
    assert [len(d.frame) for d in by_subject] == [2, 2]
    by_clip = dataset_splits(
        cfg, manifest, {"train": ["a1", "b2"], "test": ["a2"]}, "fold0-seed0", "fp", unit="sample_id"
    )
    assert [sorted(d.frame["sample_id"]) for d in by_clip] == [["a1", "b2"], ["a2"]]
    assert by_clip[0].digest != by_subject[0].digest
