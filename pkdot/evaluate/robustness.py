"""Robustness of the video models to degraded test video (``pkdot evaluate --robustness``): every trained
student and unimodal video model re-scores its (fold, seed)'s test clips after ``frame_drop``, ``noise`` or
``blur`` at several levels (0 = clean), draws seeded by (seed, fold, perturbation, level) and shared by every
model; scores get the main table's corrected intervals."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import ndimage

from pkdot.config import RunConfig
from pkdot.errors import StageError
from pkdot.evaluate.aggregate import corrected_and_naive, order_models, primary_metric
from pkdot.metrics import accuracy, ccc
from pkdot.rundir import RunDir

logger = logging.getLogger(__name__)

#: Levels of each perturbation (level 0 = the clean clip).
DEFAULT_LEVELS: dict[str, tuple[float, ...]] = {
    "frame_drop": (0.0, 0.3, 0.6, 0.9),
    "noise": (0.0, 10.0, 25.0, 50.0),
    "blur": (0.0, 1.0, 2.0, 4.0),
}
PERTURBATIONS = tuple(DEFAULT_LEVELS)
RUN_COLUMNS = (
    "model perturbation level fold seed n_samples metric value frames_dropped changed_predictions output_change "
    "agreement_with_stored"
).split()
SUMMARY_COLUMNS = (
    "model perturbation level metric mean std ci_low ci_high naive_ci_low naive_ci_high n".split()
)


# ---- perturbations -----------------------------------------------------------------------------------------
def _check_clip(clip: np.ndarray, what: str, amount: float = 0.0, name: str = "") -> np.ndarray:
    x = np.asarray(clip)
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8 or x.shape[0] < 1:
        raise StageError(f"{what}: expected a uint8 clip (T, H, W, 3) with T >= 1, got {x.dtype} {x.shape}")
    if amount < 0:
        raise StageError(f"{name} must be >= 0, got {amount}")
    return x


def frames_to_drop(n_frames: int, fraction: float) -> int:
    r"""How many of ``n_frames`` frames a drop of ``fraction`` removes: :math:`\min(T-1, \lfloor fT + 1/2
    \rfloor)` (at least one frame is kept)."""
    if not 0.0 <= fraction <= 1.0:
        raise StageError(f"frame_drop: the fraction must be in [0, 1], got {fraction}")
    return min(n_frames - 1, int(math.floor(fraction * n_frames + 0.5)))


def drop_frames(clip: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Remove ``frames_to_drop(T, fraction)`` random frames of a ``(T, H, W, 3)`` clip and re-sample it to ``T``
    frames from the kept ones (frame ``i`` = kept frame ``floor(i * kept / T)``); returns it and the count dropped."""
    x = _check_clip(clip, "drop_frames")
    t = x.shape[0]
    if (n_drop := frames_to_drop(t, fraction)) == 0:
        return x.copy(), 0
    dropped = rng.choice(t, size=n_drop, replace=False)
    kept = np.setdiff1d(np.arange(t), dropped)
    source = kept[(np.arange(t) * len(kept)) // t]
    return x[source], n_drop


def add_noise(clip: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """``clip + N(0, std^2)`` per pixel and channel (0-255 scale), rounded and clipped to uint8."""
    x = _check_clip(clip, "add_noise", std, "noise: the standard deviation")
    if std == 0:
        return x.copy()
    noisy = x.astype(np.float32) + rng.normal(0.0, std, size=x.shape).astype(np.float32)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def blur(clip: np.ndarray, sigma: float) -> np.ndarray:
    """Spatial Gaussian blur of every frame (sigma in pixels over H and W; none over time or channels)."""
    x = _check_clip(clip, "blur", sigma, "blur: sigma")
    if sigma == 0:
        return x.copy()
    out = ndimage.gaussian_filter(x.astype(np.float32), sigma=(0.0, sigma, sigma, 0.0), mode="nearest")
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def perturb_clips(
    clips: np.ndarray, perturbation: str, level: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Apply one perturbation at one level to every clip ``(N, T, H, W, 3)``: the clips and frames dropped (N,)."""
    x = np.asarray(clips)
    if x.ndim != 5:
        raise StageError(f"perturb_clips: expected clips (N, T, H, W, 3), got shape {x.shape}")
    if perturbation not in PERTURBATIONS:
        raise StageError(f"unknown perturbation {perturbation!r}; expected one of {list(PERTURBATIONS)}")
    out = np.empty_like(x)
    dropped = np.zeros(len(x), dtype=np.int64)
    for i, clip in enumerate(x):
        if perturbation == "frame_drop":
            out[i], dropped[i] = drop_frames(clip, level, rng)
        else:
            out[i] = add_noise(clip, level, rng) if perturbation == "noise" else blur(clip, level)
    return out, dropped


# ---- models ------------------------------------------------------------------------------------------------
def trained_video_models(run_dir: Path) -> list[tuple[str, int, int]]:
    """``(model, fold, seed)`` of every trained student (``student.pt``) and unimodal video model of a run."""
    rd = RunDir(run_dir)
    found = [
        (f"student-{p.parents[2].name}", p) for p in sorted(rd.students.glob("*/fold-*/seed-*/student.pt"))
    ]
    found += [("unimodal-video", p) for p in sorted(rd.teachers.glob("fold-*/seed-*/unimodal-video.pt"))]
    return [(model, int(p.parents[1].name[5:]), int(p.parent.name[5:])) for model, p in found]


def _stored_test_predictions(run_dir: Path, model: str, fold: int, seed: int) -> pd.DataFrame:
    rd = RunDir(run_dir)
    loss = model.removeprefix("student-")
    path = (rd.student(loss, fold, seed) if model != loss else rd.teacher(fold, seed)) / "predictions.parquet"
    if not path.is_file():
        raise StageError(
            f"{path} does not exist: the test samples of {model} fold {fold} seed {seed} are unknown"
        )
    pred = pd.read_parquet(path, columns=["sample_id", "y_true", "y_pred", "model", "split"])
    return pred[(pred["model"] == model) & (pred["split"] == "test")].reset_index(drop=True)


def _load_model(cfg: RunConfig, model: str, fold: int, seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The logits of a trained student, or of the unimodal video model (teacher stage, phase 1) on the CPU."""
    from pkdot.train.student import load_trained_student
    from pkdot.train.teacher import load_unimodal

    if model.startswith("student-"):
        net, _ = load_trained_student(cfg, model.removeprefix("student-"), fold, seed)
    else:
        net = load_unimodal(cfg, RunDir(cfg.run_dir).teacher(fold, seed), cfg.data.student_modalities[0])
    return lambda x: net(x).logits


@torch.no_grad()
def predict_clips(
    forward: Callable[[torch.Tensor], torch.Tensor], clips: np.ndarray, batch_size: int
) -> np.ndarray:
    """Outputs ``(N, C)`` of ``forward`` on uint8 clips ``(N, T, H, W, 3)``, in batches."""
    outs = [
        forward(torch.from_numpy(np.ascontiguousarray(clips[i : i + batch_size]))).float().numpy()
        for i in range(0, len(clips), batch_size)
    ]
    return np.concatenate(outs)


def _score(y_true: np.ndarray, outputs: np.ndarray, regression: bool) -> tuple[float, np.ndarray]:
    y_pred = (outputs[:, 0] if regression else outputs.argmax(1)).astype(np.float64)
    return (ccc if regression else accuracy)(y_true, y_pred), y_pred


def run_robustness(cfg: RunConfig, run_dir: Path | None = None) -> pd.DataFrame:
    """Score every trained video model on perturbed test clips (:data:`DEFAULT_LEVELS`): one row of
    :data:`RUN_COLUMNS` per (model, perturbation, level, fold, seed)."""
    from pkdot.train.data import load_samples

    run_dir = Path(run_dir if run_dir is not None else cfg.run_dir)
    if (video := cfg.data.student_modalities[0]) != "video":
        raise StageError(f"--robustness perturbs face video; the student modality of this run is {video!r}")
    if not (jobs := trained_video_models(run_dir)):
        raise StageError(f"{run_dir}: no trained student or unimodal video model to evaluate for robustness")
    regression = cfg.data.is_regression
    metric = primary_metric(regression)
    samples = load_samples(cfg, run_dir, modalities=[video])
    row_of = {sid: i for i, sid in enumerate(samples.sample_ids)}
    batch = cfg.train.batch_size
    records = []
    for fold, seed in sorted({(f, s) for _, f, s in jobs}):
        models = [m for m, f, s in jobs if (f, s) == (fold, seed)]
        stored = {m: _stored_test_predictions(run_dir, m, fold, seed) for m in models}
        ids = sorted(set.intersection(*(set(p["sample_id"]) for p in stored.values())))
        missing = [s for s in ids if s not in row_of]
        if not ids or missing:
            raise StageError(
                f"fold {fold} seed {seed}: {len(missing)} of {len(ids)} test samples have no face features "
                f"in {RunDir(run_dir).features}"
            )
        index = np.array([row_of[s] for s in ids])
        clean = samples.arrays[video][index]
        y_true = samples.targets[index].astype(np.float64)
        forwards = {m: _load_model(cfg, m, fold, seed) for m in models}
        clean_outputs = {m: predict_clips(forwards[m], clean, batch) for m in models}
        for p_index, (perturbation, plevels) in enumerate(DEFAULT_LEVELS.items()):
            for level in plevels:
                rng = np.random.default_rng([seed, fold, p_index, int(round(level * 1000))])
                clips, dropped = perturb_clips(clean, perturbation, level, rng)
                for model in models:
                    outputs = predict_clips(forwards[model], clips, batch)
                    value, y_pred = _score(y_true, outputs, regression)
                    _, clean_pred = _score(y_true, clean_outputs[model], regression)
                    agreement = math.nan
                    if level == 0:
                        ref = stored[model].set_index("sample_id").loc[ids, "y_pred"].to_numpy(np.float64)
                        close = np.isclose(ref, y_pred, atol=1e-4) if regression else ref == y_pred
                        agreement = float(np.mean(close))
                        if agreement < 0.99:
                            logger.warning(
                                "robustness: clean re-run of %s fold %d seed %d agrees with its stored test "
                                "predictions on only %.1f%% of samples",
                                *(model, fold, seed, 100 * agreement),
                            )
                    changed = float(np.mean(y_pred != clean_pred))
                    output_change = float(np.abs(outputs - clean_outputs[model]).mean())
                    run = (model, perturbation, float(level), fold, seed, len(ids), metric, value)
                    records.append((*run, float(dropped.mean()), changed, output_change, agreement))
        logger.info("robustness: fold %d seed %d done (%d models)", fold, seed, len(models))
    return pd.DataFrame.from_records(records, columns=RUN_COLUMNS)


def summarise_robustness(
    runs: pd.DataFrame, *, metric: str, level: float = 0.95, test_train_ratio: float | None = None
) -> pd.DataFrame:
    """Mean and corrected CI over runs of each (model, perturbation, level) (:func:`run_robustness` rows)."""
    if runs.empty:
        raise StageError("summarise_robustness: no robustness rows")
    records = []
    for (model, perturbation, lv), g in runs.groupby(["model", "perturbation", "level"], sort=False):
        stats_ = corrected_and_naive(g["value"].to_numpy(), None, level, test_train_ratio, metric)
        rec = {"model": model, "perturbation": perturbation, "level": float(lv), "metric": metric}
        records.append(rec | stats_ | {"n": int(len(g))})

    order = {m: i for i, m in enumerate([*dict.fromkeys(runs["perturbation"]), *order_models(runs["model"])])}
    out = pd.DataFrame.from_records(records, columns=SUMMARY_COLUMNS)
    by = lambda column: column if column.name == "level" else column.map(order)  # noqa: E731
    return out.sort_values(["perturbation", "model", "level"], key=by, ignore_index=True)
