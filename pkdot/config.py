"""The run configuration: one pydantic model for a whole pipeline run.

Every field has a default, so ``pkdot run`` needs no file. A YAML file (or the CLI's ``--set a.b=value``
overrides) replaces fields; a preset (``demo`` or ``paper``) is applied first. Invalid values raise
:class:`pkdot.errors.ConfigError` naming the field, before any work starts."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pkdot.errors import ConfigError

logger = logging.getLogger(__name__)
Preset = Literal["demo", "paper"]
Task = Literal["binary", "multiclass", "valence", "arousal", "regression"]
AnchorCount = Annotated[int, Field(ge=1)] | Literal["all"]

#: Modality name -> feature file stem under ``<run>/features/`` for the extracted data sets.
MODALITY_FILES: dict[str, str] = {"video": "faces", "physio": "physio", "audio": "audio"}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """Which data set, where it lives, which task and which modalities."""

    dataset: Literal["biovid", "affwild2", "table"] = "biovid"
    root: Path | None = Field(None, description="Dataset root (None = the synthetic set of the run)")
    part: Literal["A", "B"] = Field("A", description="Biovid part (B adds facial EMG)")
    task: Task = Field(
        "binary",
        description="binary / multiclass (classification), valence / arousal (Aff-Wild2), "
        "regression (table data: a float 'target' column)",
    )
    num_classes: int | None = Field(
        None,
        ge=2,
        description="Classes of a multiclass task (None: 5 for Biovid; for table data inferred from the "
        "labels when the run is prepared)",
    )
    skip_bad: bool = Field(False, description="Skip and report bad samples instead of failing")
    # Aff-Wild2 clip windows (frames of the annotation/video timeline)
    clip_frames: int = Field(50, ge=2, description="Aff-Wild2 clip length in frames")
    clip_stride: int = Field(50, ge=1, description="Aff-Wild2 step between clip starts in frames")
    min_annotated: float = Field(0.5, gt=0.0, le=1.0, description="Min fraction of annotated frames")
    faces: Literal["video", "frames"] | None = Field(
        None,
        description="Where face crops come from: 'video' (decode + detect) or 'frames' (face-crop folders: "
        "Aff-Wild2 cropped_aligned/<video>/<frame:05d>.jpg, Biovid frames/<subject>/<sample>/<frame:05d>.jpg; "
        "1-based, a missing file = no face); None = 'frames' when that folder exists under the root",
    )
    # Modalities: what the student sees at test time, and what only the teacher sees.
    student_modalities: list[str] = Field(default_factory=lambda: ["video"], min_length=1)
    privileged_modalities: list[str] = Field(default_factory=lambda: ["physio"], min_length=1)

    @model_validator(mode="after")
    def _modalities(self) -> DataConfig:
        if both := set(self.student_modalities) & set(self.privileged_modalities):
            raise ValueError(f"modalities {sorted(both)} are both student and privileged")
        if self.dataset == "biovid" and self.task not in ("binary", "multiclass"):
            raise ValueError(f"task {self.task!r} is not a Biovid task (expected 'binary' or 'multiclass')")
        if self.dataset == "affwild2" and self.task not in ("valence", "arousal"):
            raise ValueError(f"task {self.task!r} is not an Aff-Wild2 task (expected 'valence' or 'arousal')")
        if self.task == "regression" and self.dataset != "table":
            raise ValueError("task 'regression' is for table data (a float 'target' column)")
        if self.num_classes is not None:
            if self.task != "multiclass":
                raise ValueError(f"num_classes is for task 'multiclass', not {self.task!r}")
            if self.dataset == "biovid" and self.num_classes != 5:
                raise ValueError(f"Biovid multiclass has 5 classes, got num_classes={self.num_classes}")
        return self

    @property
    def modalities(self) -> list[str]:
        return [*self.student_modalities, *self.privileged_modalities]

    @property
    def is_regression(self) -> bool:
        return self.task in ("valence", "arousal", "regression")

    @property
    def target_column(self) -> str:
        """The manifest column of the task's targets."""
        return {"regression": "target", "valence": "valence", "arousal": "arousal"}.get(self.task, "label")

    @property
    def num_outputs(self) -> int:
        """Classes for classification, 1 for regression (a table run's multiclass ``num_classes`` is inferred
        from its labels when the run is prepared; reading this before then raises :class:`ConfigError`)."""
        if self.task == "multiclass":
            if self.num_classes is not None:
                return self.num_classes
            if self.dataset == "table":
                raise ConfigError(
                    "data.num_classes: not set and not yet inferred from the table's labels "
                    "(prepare the run first, or set data.num_classes)"
                )
            return 5
        return {"binary": 2, "valence": 1, "arousal": 1, "regression": 1}[self.task]


class SynthConfig(_Section):
    """Size of the synthetic data set written when no root is given."""

    subjects: int = Field(8, ge=2)
    samples_per_class: int = Field(4, ge=1, description="Biovid: windows per class per subject")
    videos_per_subject: int = Field(1, ge=1, description="Aff-Wild2: videos per subject")
    seconds_per_video: float = Field(12.0, gt=0)
    frame_size: int = Field(160, ge=64, description="Synthetic video frame side (pixels)")
    fps: int = Field(25, ge=5)
    coupling: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="How much the privileged modality (physio / audio) and the face share one latent response: "
        "1 = one shared response (privileged information is learnable from video), 0 = independent given the "
        "label (negative control). See pkdot.data.synthetic",
    )


class FeatureConfig(_Section):
    """Stage 1: face crops, physiological and audio features."""

    n_frames: int = Field(10, ge=1, description="Frames sampled per clip (TSN: one per segment)")
    crop_size: int = Field(112, ge=16)
    face_margin: float = Field(0.25, ge=0.0, le=1.0)
    detector: Literal["haar", "yunet"] = "haar"
    yunet_model: Path | None = Field(None, description="ONNX file for OpenCV FaceDetectorYN")
    min_face_px: int = Field(
        64,
        ge=8,
        description="Smallest face width to find, in source pixels: frames are downscaled for detection so "
        "that a face of this width still spans the detector's minimum (24 px for Haar)",
    )
    detect_width: int | None = Field(
        None,
        ge=64,
        description="Optional cap on the width frames are downscaled to for detection (speed); None = the "
        "scale follows min_face_px. A cap below what min_face_px needs raises the smallest face found "
        "(logged)",
    )
    detect_every: int = Field(
        3,
        ge=1,
        description="The face detector runs (near the tracked box) on every N-th sampled frame of a clip; in "
        "between the box follows the face by template matching (1 = detect on every frame). The whole frame "
        "is searched on a clip's first sampled frame and whenever the face is lost",
    )
    box_smoothing: float = Field(0.5, ge=0.0, lt=1.0, description="EMA factor on face boxes")
    # Physio (Biovid: 512 Hz, 5.5 s windows; the authors use seconds 2-5)
    physio_fs: float = Field(512.0, gt=0)
    physio_channels: list[str] | None = Field(None, description="None = every channel of the part")
    physio_window: tuple[float, float] = (2.0, 5.0)
    max_nan_gap_s: float = Field(0.1, ge=0.0, description="Longer NaN runs quarantine the sample")
    biovid_window_s: float = Field(5.5, gt=0, description="Seconds of a Biovid sample (video and biosignals)")
    duration_tolerance_s: float = Field(
        0.5,
        ge=0,
        description="A recording shorter than its sample's window (biovid_window_s) by more than this, or a "
        "video and a biosignal file of one sample whose durations differ by more than this, quarantines the sample",
    )
    spec_nperseg: int = Field(16, ge=4)
    spec_noverlap: int = Field(4, ge=0)
    spec_nfft: int = Field(128, ge=4)
    # Audio
    audio_sr: int = Field(16000, ge=4000)
    n_mels: int = Field(64, ge=8)
    hop_length: int = Field(160, ge=16)
    # Execution
    workers: int = Field(2, ge=1)
    shard_size: int = Field(32, ge=1)

    @model_validator(mode="after")
    def _spec(self) -> FeatureConfig:
        if self.spec_noverlap >= self.spec_nperseg:
            raise ValueError("spec_noverlap must be smaller than spec_nperseg")
        if self.spec_nfft < self.spec_nperseg:
            raise ValueError("spec_nfft must be >= spec_nperseg")
        lo, hi = self.physio_window
        if not 0 <= lo < hi:
            raise ValueError(
                f"physio_window must be (start, end) seconds with 0 <= start < end, got {lo, hi}"
            )
        return self


class ModelConfig(_Section):
    """Backbones, fusion and T-Net sizes."""

    embed_dim: int = Field(512, ge=4)
    video_backbone: Literal["r3d18", "small3d"] = "r3d18"
    video_width: int = Field(64, ge=4, description="Channels of the first video stage")
    physio_input: Literal["spectrogram", "window"] = "spectrogram"
    physio_width: int = Field(64, ge=4)
    audio_width: int = Field(64, ge=4)
    mlp_hidden: int = Field(256, ge=4, description="Hidden size of MLP backbones (table data)")
    fusion_heads: int = Field(2, ge=1)
    fusion_layers: int = Field(1, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    tnet_hidden: list[int] = Field(default_factory=lambda: [256, 128, 256])
    pretrained_video: Path | None = Field(None, description="Local state_dict for the video backbone")

    @model_validator(mode="after")
    def _heads(self) -> ModelConfig:
        if self.embed_dim % self.fusion_heads:
            raise ValueError(
                f"embed_dim ({self.embed_dim}) must be divisible by fusion_heads ({self.fusion_heads})"
            )
        return self


#: The authors'-protocol switches (train field -> value), each optimistic by construction.
_OPTIMISTIC = {"folds": "clips", "select_on": "test", "teacher_scope": "all"}


class TrainConfig(_Section):
    """Teacher/student optimisation, folds and Ray Train scaling."""

    folds: Annotated[int, Field(ge=2)] | Literal["loso", "official", "clips"] | None = Field(
        None,
        description="Subject k-fold (int >= 2), 'loso', or 'official' (Aff-Wild2: train on Train_Set minus a "
        "validation carve-out, test on Validation_Set); None = 'official' for Aff-Wild2, 5 otherwise. "
        "'clips' (authors' protocol, optimistic by construction): stratified 5-fold over samples, ignoring "
        "subjects",
    )
    select_on: Literal["val", "test"] = Field(
        "val",
        description="Where each model's epoch is selected: 'val' (validation subjects) or 'test' (authors' "
        "protocol, optimistic by construction: the fold's test samples serve as its validation part)",
    )
    teacher_scope: Literal["fold", "all"] = Field(
        "fold",
        description="'fold': each fold's teacher trains on the fold's training subjects; 'all' (authors' "
        "protocol, optimistic by construction): on every sample but the validation carve-out, test included",
    )
    max_folds: int | None = Field(None, ge=1, description="Run only the first N folds")
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="Training subjects held for validation")
    batch_size: int = Field(128, ge=2)
    teacher_batch_size: int = Field(64, ge=2)
    epochs_unimodal: int = Field(20, ge=1)
    epochs_teacher: int = Field(20, ge=1)
    epochs_tnet: int = Field(20, ge=1)
    epochs_student: int = Field(20, ge=1)
    lr_backbone: float = Field(1e-3, gt=0)
    lr_teacher_backbone: float = Field(1e-4, gt=0)
    lr_fusion: float = Field(1e-3, gt=0)
    lr_tnet: float = Field(5e-5, gt=0)
    lr_student: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    optimizer: Literal["sgd", "adam"] = Field("sgd", description="Teacher phases (paper: SGD, momentum 0.9)")
    student_init: Literal["teacher-frozen", "teacher-finetune", "scratch", "pretrained"] = Field(
        "teacher-frozen",
        description="The student's video backbone: 'teacher-frozen' (the paper's: the teacher's, frozen; the "
        "student trains from cached tokens), 'teacher-finetune' (starts from the teacher's, trained), 'scratch' "
        "(freshly initialised), 'pretrained' (loads model.pretrained_video). Non-frozen students read the face "
        "crops. Replaces freeze_student_backbone (true = teacher-frozen, false = teacher-finetune; still read)",
    )
    num_workers: int = Field(2, ge=0, description="Ray Train workers per run; 0: local mode, the task trains")
    use_gpu: bool | Literal["auto"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="Autocast precision of training and prediction ('auto': bf16 on a CUDA GPU that supports "
        "it, fp32 otherwise; 'fp16' adds gradient scaling); losses are computed in fp32",
    )
    max_failures: int = Field(2, ge=0)
    checkpoint_every_s: float = Field(20.0, ge=0, description="Min seconds between Ray Train checkpoints")
    max_concurrent_jobs: int | None = Field(
        None,
        ge=1,
        description="Training runs (one per job or bundle) at once on Ray; None = as many as the cluster's "
        "CPUs/GPUs hold (num_workers x cpus_per_worker [x gpus_per_worker] each)",
    )
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per Ray Train worker")
    gpus_per_worker: float = Field(1.0, gt=0, description="GPUs reserved per Ray Train worker (GPU runs)")
    jobs_per_run: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        1,
        description="Jobs (fold x seed [x loss]) bundled into one Ray Train run, run one after another in it "
        "(amortises Ray Train's start-up, seconds per run, over short jobs); 'auto': as many runs as fit at "
        "once, the stage's jobs shared evenly between them",
    )

    refit: bool = Field(
        True,
        description="Refit the configuration chosen on validation on every subject and register that model (the "
        "refit stage); false registers the best-validation fold model instead",
    )
    seeds: list[int] = Field(
        default_factory=lambda: [0],
        min_length=1,
        description="Training seeds: each repeats every fold with its own folds (one at least)",
    )

    @property
    def optimistic_switches(self) -> list[str]:
        """The authors'-protocol switches this config sets (each makes scores optimistic by construction)."""
        return [f"train.{k}={v}" for k, v in _OPTIMISTIC.items() if getattr(self, k) == v]

    @property
    def student_backbone_frozen(self) -> bool:
        """Whether the student keeps the teacher's frozen video backbone (and trains from cached tokens)."""
        return self.student_init == "teacher-frozen"


# ---- distillation: one options model per loss (its class's keyword arguments) and its term's weight --------
def _weight(default: float) -> Any:
    return Field(default, ge=0.0, allow_inf_nan=False, description="Weight of this loss's term")


class LossOptions(_Section):
    """Options of one distillation loss and the weight of its term (the weight's source: the loss's module)."""

    weight: float = _weight(1.0)


class NoneOptions(LossOptions):
    weight: float = _weight(0.0)


class KDOptions(LossOptions):
    temperature: float = Field(4.0, gt=0, description="Softmax temperature T")


class FitNetOptions(LossOptions):
    pass


class SPOptions(LossOptions):
    weight: float = _weight(3000.0)


class RKDOptions(LossOptions):
    distance_weight: float = Field(25.0, ge=0)
    angle_weight: float = Field(50.0, ge=0)


class PKTOptions(LossOptions):
    weight: float = _weight(30000.0)


class CRDOptions(LossOptions):
    weight: float = _weight(0.8)
    n_negatives: int | None = Field(None, ge=1, description="Negatives per sample (None: min(4096, N-1))")
    temperature: float = Field(0.07, gt=0, description="NCE temperature")
    momentum: float = Field(0.5, ge=0.0, lt=1.0, description="Memory-bank momentum")
    feat_dim: int = Field(128, ge=1, description="Width of the shared embedding")
    seed: int = Field(0, description="Seed of the memory initialisation and negative sampling")


class PkdotOptions(LossOptions):
    weight: float = _weight(0.6)
    k: AnchorCount = Field(30, description="Anchors per row (int >= 1 or 'all')")
    anchors: Literal["least", "most"] = Field("least", description="Least or most similar columns")
    blur: float = Field(0.1, gt=0, description="Sinkhorn blur (eps = blur^2)")
    scaling: float = Field(0.5, gt=0, lt=1, description="Epsilon-scaling ratio")


class PkdotMostOptions(PkdotOptions):
    """PKDOT on the k most-similar anchors (a structure-faithful variant)."""

    anchors: Literal["least", "most"] = Field("most", description="Least or most similar columns")


class PkdotAllOptions(PkdotOptions):
    """PKDOT on every column of the similarity matrices (a structure-faithful variant)."""

    k: AnchorCount = Field("all", description="Anchors per row (int >= 1 or 'all')")


class DistillConfig(_Section):
    """The student's objective: task_weight * task loss + ``<loss>.weight`` * the loss of ``losses``.

    Each field typed by a :class:`LossOptions` subclass is one loss (named by the field's alias when it has
    one, e.g. ``pkdot-most``); they make :data:`LOSSES`."""

    model_config = ConfigDict(validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)

    losses: list[str] = Field(
        default_factory=lambda: list(DEFAULT_LOSSES),
        description="One student per loss; 'a+b' trains one student on the sum of registered losses a and b",
    )
    task_weight: float = Field(1.0, ge=0.0)
    none: NoneOptions = Field(default_factory=NoneOptions)
    kd: KDOptions = Field(default_factory=KDOptions)
    fitnet: FitNetOptions = Field(default_factory=FitNetOptions)
    sp: SPOptions = Field(default_factory=SPOptions)
    rkd: RKDOptions = Field(default_factory=RKDOptions)
    pkt: PKTOptions = Field(default_factory=PKTOptions)
    crd: CRDOptions = Field(default_factory=CRDOptions)
    pkdot: PkdotOptions = Field(default_factory=PkdotOptions)
    pkdot_most: PkdotMostOptions = Field(default_factory=PkdotMostOptions, alias="pkdot-most")
    pkdot_all: PkdotAllOptions = Field(default_factory=PkdotAllOptions, alias="pkdot-all")
    use_tnet: bool = True
    teacher_targets: Literal["fit", "crossfit"] = Field(
        "fit",
        description="'fit' (the paper's): targets from the teacher trained on the fold's training subjects; "
        "'crossfit': training subjects are cut into crossfit_groups groups and a teacher trained without "
        "group j gives group j's targets (val/test: the full-fold teacher); student batches stay in one group",
    )
    crossfit_groups: int = Field(3, ge=2, description="Groups J of teacher_targets='crossfit'")
    teacher_source: Literal["fusion", "privileged"] = Field(
        "fusion",
        description="Which trained model's embedding and outputs the student imitates: 'fusion' (the paper's: "
        "the multimodal teacher) or 'privileged' (the unimodal model of the one privileged modality, trained "
        "in the teacher stage's phase 1). The student's T-Nets and frozen tokens still come from the fusion "
        "teacher's job",
    )

    @field_validator("losses")
    @classmethod
    def _losses(cls, v: list[str]) -> list[str]:
        if problem := loss_names_problem(v):
            raise ValueError(problem)
        return v

    def options(self, name: str) -> Any:
        """The options section of loss ``name`` (``distill.<name>``); of a composite ``a+b``, ``{part: section}``."""
        if "+" in name:
            return {part: self.options(part) for part in loss_terms(name)}
        if name not in LOSSES:
            raise ConfigError(f"distill: unknown loss {name!r} (valid: {', '.join(LOSSES)})")
        return getattr(self, name.replace("-", "_"))

    def weight(self, name: str) -> float:
        """The weight of loss ``name``'s term (``distill.<name>.weight``)."""
        return self.options(name).weight


def loss_terms(name: str) -> list[str]:
    """The registered losses a loss name sums: ``"kd+pkdot"`` -> ``["kd", "pkdot"]``, ``"kd"`` -> ``["kd"]``."""
    return name.split("+")


def _loss_name_problem(name: str) -> str | None:
    terms = loss_terms(name)
    if unknown := [t for t in terms if t not in LOSSES]:
        return f"unknown loss(es) {unknown}" + (f" in {name!r}" if len(terms) > 1 else "")
    if len(terms) > 1 and "none" in terms:
        return f"{name!r}: 'none' cannot be part of a sum"
    if len(set(terms)) != len(terms):
        return f"{name!r} repeats a term"
    return None


def loss_names_problem(names: list[str]) -> str | None:
    """What is wrong with a list of losses to train (empty, duplicates, unknown names, bad sums), or None."""
    if not names:
        return "losses must name at least one loss"
    if len({frozenset(loss_terms(n)) for n in names}) != len(names):
        return f"losses has duplicates: {names}"
    if problems := [p for p in map(_loss_name_problem, names) if p]:
        return f"{'; '.join(problems)} (valid: {', '.join(LOSSES)}, or sums of them such as 'kd+pkdot')"
    return None


#: Loss name -> its options model: THE list of distillation losses (pkdot.distill registers exactly these).
LOSSES: dict[str, type[LossOptions]] = {
    field.alias or name: field.annotation
    for name, field in DistillConfig.model_fields.items()
    if isinstance(field.annotation, type) and issubclass(field.annotation, LossOptions)
}
#: The losses a run trains by default: every loss but the structure-faithful PKDOT variants.
DEFAULT_LOSSES = [name for name in LOSSES if name not in ("pkdot-most", "pkdot-all")]
#: Former distill fields (before per-loss sections) -> their section; ``options.<loss>`` -> ``<loss>``.
_MOVED = {"k": "pkdot", "anchors": "pkdot", "blur": "pkdot", "scaling": "pkdot", "temperature": "kd"}


def _upgrade(layer: dict[str, Any], source: str) -> dict[str, Any]:
    """One config layer with former fields mapped onto today's: ``train.freeze_student_backbone``,
    ``distill.{k,anchors,blur,scaling,temperature,options}``; and ``distill.weights.<loss>`` (an alias of
    ``distill.<loss>.weight``)."""
    layer = dict(layer)
    if isinstance(train := layer.get("train"), dict) and "freeze_student_backbone" in train:
        train = layer["train"] = dict(train)
        freeze = train.pop("freeze_student_backbone")
        mapped = "teacher-frozen" if freeze is True else "teacher-finetune" if freeze is False else None
        if mapped is None or train.setdefault("student_init", mapped) != mapped:
            problem = "must be true or false" if mapped is None else f"contradicts {train['student_init']!r}"
            raise ConfigError(
                f"{source}: train.freeze_student_backbone={freeze!r} {problem} (set student_init only)"
            )
    if not isinstance(distill := layer.get("distill"), dict):
        return layer
    distill = layer["distill"] = dict(distill)
    if "weight" in distill:
        raise ConfigError(
            f"{source}: distill.weight (got {distill['weight']!r}) was replaced by per-loss weights: set "
            "distill.<loss>.weight, e.g. distill.pkdot.weight=0.6"
        )
    moved = []  # (former key, section, option, value)
    for key, value in (distill.pop("weights", None) or {}).items():
        if key not in LOSSES:
            raise ConfigError(
                f"{source}: distill.weights.{key}: unknown loss {key!r} (valid: {', '.join(LOSSES)})"
            )
        moved.append((f"weights.{key}", key, "weight", value))
    moved += [(key, _MOVED[key], key, distill.pop(key)) for key in _MOVED if key in distill]
    for name, options in (distill.pop("options", None) or {}).items():
        moved += [(f"options.{name}.{key}", name, key, value) for key, value in (options or {}).items()]
    for key, section, option, value in moved:
        target = distill.setdefault(section, {})
        if not isinstance(target, dict) or target.setdefault(option, value) != value:
            raise ConfigError(f"{source}: distill.{key}={value!r} contradicts distill.{section}.{option}")
    if renamed := [f"distill.{k} -> distill.{s}.{o}" for k, s, o, _ in moved if not k.startswith("weights.")]:
        logger.warning("%s: former distill fields, set the new ones: %s", source, ", ".join(renamed))
    return layer


class TrackingConfig(_Section):
    """MLflow: URI (None = SQLite under the run directory, or $MLFLOW_TRACKING_URI), experiment, registry."""

    tracking_uri: str | None = None
    public_uri: str | None = Field(
        None,
        description="The MLflow UI address people open (links in Prefect artifacts and printed messages), when "
        "it differs from the tracking URI the processes log to (e.g. http://localhost:5000 for a compose "
        "stack whose services reach MLflow at http://mlflow:5000). None = $PKDOT_MLFLOW_PUBLIC_URI, else the "
        "tracking URI when it is an http(s) server",
    )
    experiment: str = "pkdot"
    register_model: bool = True
    log_checkpoints: bool = Field(True, description="Log teacher/T-Net/student checkpoints as artifacts")
    model_name: str | None = Field(None, description="Default: pkdot-student-<dataset>")


class EvaluateConfig(_Section):
    """The evaluate stage: what the report holds beyond the test scores."""

    robustness: bool | None = Field(
        None,
        description="Robustness curves: the students and the unimodal video model re-evaluated on degraded "
        "test video (0-90 % of frames dropped, Gaussian noise, blur; report/robustness.png, robustness.csv, "
        "MLflow metrics). None = whenever the student's modality is video (the data sets' default); true on a "
        "student without video is a configuration error",
    )


class RunConfig(_Section):
    """A whole pipeline run."""

    name: str = "pkdot"
    preset: Preset = "demo"
    seed: int = 0
    run_dir: Path = Path("runs/demo")
    ray_address: str | None = Field(
        None, description="Ray cluster ('auto' or host:port); None = $RAY_ADDRESS or a local Ray"
    )
    data: DataConfig = Field(default_factory=DataConfig)
    synth: SynthConfig = Field(default_factory=SynthConfig)
    features: FeatureConfig = Field(default_factory=FeatureConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    @field_validator("run_dir")
    @classmethod
    def _absolute_run_dir(cls, value: Path) -> Path:
        """Made absolute against the current directory: Ray Train workers run in their own working directory,
        where a relative run directory names another folder."""
        return Path(value).expanduser().resolve()

    @model_validator(mode="after")
    def _cross(self) -> RunConfig:
        known = {"biovid": ("Biovid", "video", "physio"), "affwild2": ("Aff-Wild2", "video", "audio")}
        name, *allowed = known.get(self.data.dataset, ("", *self.data.modalities))
        if bad := [m for m in self.data.modalities if m not in allowed]:
            raise ValueError(f"{name} has modalities {' and '.join(allowed)}, not {bad[0]!r}")
        if self.train.student_init == "pretrained" and self.model.pretrained_video is None:
            raise ValueError(
                "train.student_init 'pretrained' needs model.pretrained_video (a local state_dict file of the "
                "video backbone)"
            )
        if len(self.data.student_modalities) > 1:
            raise ValueError(
                f"data.student_modalities {self.data.student_modalities}: the student reads one modality (the one "
                "it has at test time); several privileged (teacher-only) modalities are supported"
            )
        if self.distill.teacher_source == "privileged" and len(self.data.privileged_modalities) != 1:
            raise ValueError(
                f"distill.teacher_source 'privileged' imitates the unimodal model of *the* privileged modality; "
                f"data.privileged_modalities is {self.data.privileged_modalities} (name one, or use 'fusion')"
            )
        if self.evaluate.robustness and "video" not in self.data.student_modalities:
            raise ValueError(
                f"evaluate.robustness is true, but the student reads {self.data.student_modalities}: the "
                "robustness curves degrade test *video* (set it to false or null)"
            )
        if self.train.folds == "clips" and self.distill.teacher_targets == "crossfit":
            raise ValueError("train.folds 'clips' cannot be combined with distill.teacher_targets 'crossfit'")
        if self.train.folds is None:  # the data set's usual protocol
            self.train.folds = "official" if self.data.dataset == "affwild2" else 5
        elif self.train.folds == "official" and self.data.dataset != "affwild2":
            raise ValueError(
                f"train.folds 'official' is Aff-Wild2's Train_Set/Validation_Set protocol; dataset "
                f"{self.data.dataset!r} uses subject k-fold (an integer) or 'loso'"
            )
        return self

    @property
    def robustness_curves(self) -> bool:
        """Whether the evaluate stage computes robustness curves (``evaluate.robustness``, resolved)."""
        if self.evaluate.robustness is None:
            return "video" in self.data.student_modalities
        return self.evaluate.robustness

    def section_hash(self, *sections: str) -> str:
        """A stable hash of some sections (for caching a stage on its inputs)."""
        dump = self.model_dump(mode="json")
        payload = {s: dump[s] for s in sections} if sections else dump
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def flat(self) -> dict[str, Any]:
        """The config as ``{"a.b": value}`` (for MLflow params)."""
        return _flatten(self.model_dump(mode="json"))

    def yaml_text(self) -> str:
        """The config as YAML (write it with :func:`pkdot.rundir.atomic_write_text`)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ---- presets -----------------------------------------------------------------------------------------------
PRESETS: dict[str, dict[str, Any]] = {
    # Tiny models: seconds per epoch on a 2-core CPU.
    "demo": {
        "preset": "demo",
        # min_face_px 24: the demo's 160-px frames are searched at full resolution
        "features": {"n_frames": 8, "crop_size": 48, "min_face_px": 24, "shard_size": 16, "n_mels": 32},
        "model": {
            "embed_dim": 64,
            "video_backbone": "small3d",
            "video_width": 8,
            "physio_width": 8,
            "audio_width": 8,
            "mlp_hidden": 64,
            "tnet_hidden": [64, 32, 64],
        },
        "train": {
            "batch_size": 32,
            "teacher_batch_size": 32,
            "epochs_unimodal": 8,
            "epochs_teacher": 6,
            "epochs_tnet": 10,
            "epochs_student": 8,
            "lr_backbone": 3e-3,
            "lr_teacher_backbone": 1e-3,
            "lr_fusion": 3e-3,
            "lr_tnet": 3e-3,
            "lr_student": 3e-3,
            "optimizer": "adam",
            # Picked by validation in the quality benchmark (benchmarks/results/quality-biovid.md: val
            # accuracy 0.650/0.654/0.625 for none/kd/pkdot vs 0.604/0.583/0.596 with 'teacher-frozen').
            "student_init": "teacher-finetune",
            # seconds per job, ~7-11 s to start a worker group (benchmarks/results/speed.md): local-mode runs
            "num_workers": 0,
            "jobs_per_run": "auto",
            "max_folds": 3,  # 3 of 5 folds and 4 students: a short demo (benchmarks and your runs lift both)
        },
        "distill": {"losses": ["none", "kd", "rkd", "pkdot"], "pkdot": {"k": 10}, "pkdot-most": {"k": 10}},
        # 10 fps: the 8 frames the features sample per window, from a set 2.5x cheaper to render and decode
        "synth": {"subjects": 10, "samples_per_class": 8, "fps": 10},
    },
    # The paper's sizes (R3D-18-like, 112x112, 10 frames, batch 128, k = 30, weight 0.6) are the defaults;
    # student_init as in `demo` (validation's pick).
    "paper": {"preset": "paper", "train": {"student_init": "teacher-finetune"}},
}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out |= _flatten(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v}
    return out


def _deep_merge(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in new.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    *sections, key = dotted.split(".")
    for p in sections:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"override {dotted!r}: {p!r} is not a section")
    d[key] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.epochs_student=3"`` -> ``("train.epochs_student", 3)`` (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. train.epochs_student=3")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def _valid_fields(loc: tuple[Any, ...]) -> str:
    """`` (valid: a, b, ...)``: the fields of the section that holds ``loc`` (for an unknown field)."""
    model: Any = RunConfig
    for part in loc[:-1]:
        fields = {f.alias or n: f for n, f in model.model_fields.items()}
        field = fields.get(part) if isinstance(part, str) else None
        model = field.annotation if field is not None else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return ""
    return f" (valid: {', '.join(f.alias or n for n, f in model.model_fields.items())})"


def _format_validation(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "<root>"
        valid = _valid_fields(e["loc"]) if e["type"] == "extra_forbidden" else ""
        got = f" (got {e.get('input')!r})" if e["loc"] else ""
        lines.append(f"  {loc}: {e['msg']}{valid}{got}")
    return f"invalid run configuration ({source}):\n" + "\n".join(lines)


def load_config(
    path: str | Path | None = None,
    *,
    preset: str | None = None,
    overrides: dict[str, Any] | list[str] | None = None,
) -> RunConfig:
    """Build a :class:`RunConfig` from a preset, an optional YAML file and dotted overrides.

    Order: defaults <- preset (``preset`` argument, else the file's ``preset`` key, else ``demo``)
    <- YAML file <- overrides. Raises :class:`ConfigError` naming the field on any invalid value."""
    file_data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            file_data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
        if not isinstance(file_data, dict):
            raise ConfigError(
                f"config file {p}: expected a mapping at the top level, got {type(file_data).__name__}"
            )
        source = str(p)
    over: dict[str, Any] = {}
    if isinstance(overrides, list):
        pairs = [parse_override(item) for item in overrides]
    else:
        pairs = [(k, v) for k, v in (overrides or {}).items() if v is not None]
    for k, v in pairs:
        _set_dotted(over, k, v)
    if (chosen := preset or over.get("preset") or file_data.get("preset") or "demo") not in PRESETS:
        raise ConfigError(f"preset: unknown preset {chosen!r} (expected one of {sorted(PRESETS)})")
    merged = copy.deepcopy(PRESETS[chosen])
    if switches := [f"train.{k}={v}" for k, v in merged.get("train", {}).items() if _OPTIMISTIC.get(k) == v]:
        raise ConfigError(
            f"preset {chosen!r} sets {', '.join(switches)}: the authors'-protocol switches are optimistic by "
            "construction and never part of a preset (set them in the run's config)"
        )
    for layer in (_upgrade(file_data, source), _upgrade(over, "overrides")):
        merged = _deep_merge(merged, layer)
    merged["preset"] = chosen
    try:
        return RunConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_format_validation(exc, source)) from None
