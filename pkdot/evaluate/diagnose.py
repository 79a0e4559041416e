"""Will privileged information help on my data? Linear probes with subject-grouped cross-validation.

On a feature table or a run's features, before any training, repeated subject k-fold measures on test subjects
the head-room (student view, privileged view, both), the transfer (R² of the privileged model's output
predicted from the student view, overall and beyond the label: only that part teaches what labels do not) and
the gain of a student fitted on cross-fitted soft labels over one fitted on labels (generalised distillation,
Lopez-Paz et al., ICLR 2016), with Nadeau-Bengio corrected intervals; the verdict rule is :data:`RULE`."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow.parquet as pq
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression, Ridge, RidgeCV
from sklearn.metrics import r2_score
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pkdot.config import load_config
from pkdot.data.manifest import read_manifest
from pkdot.errors import DatasetError, StageError
from pkdot.evaluate.aggregate import corrected_and_naive
from pkdot.features.schema import DEFAULT_TENSOR, iter_tensors
from pkdot.metrics import ccc
from pkdot.rundir import RunDir, atomic_write_json

MIN_SUBJECTS = 10
MARGIN = 0.02
MIN_TRANSFER_R2 = 0.05
RULE = (
    f"can help: gain interval above 0; unlikely to help: gain interval below +{MARGIN} or R² beyond the "
    f"label < {MIN_TRANSFER_R2}; too few subjects to tell: < {MIN_SUBJECTS} subjects or neither"
)
PROBES = ("student", "privileged", "both", "soft_label_student")
DIFFERENCES = {"gain": ("soft_label_student", "student"), "headroom": ("privileged", "student")}
#: A run directory's modality wider than this is reduced by PCA (label-free, on all rows).
MAX_DIMS = 50


class Views(NamedTuple):
    """N samples in two views, ``student`` (N, Ds) and ``privileged`` (N, Dp); ``target``, ``subject`` (N,)"""

    student: np.ndarray
    privileged: np.ndarray
    target: np.ndarray
    subject: np.ndarray
    regression: bool = False
    names: tuple[list[str], list[str]] = ([], [])


def fit_probe(
    x: np.ndarray, y: np.ndarray, regression: bool = False, weight: np.ndarray | None = None
) -> Any:
    """Standardise, then L2 logistic regression (``C = 1``) or ridge (``alpha = 1``); optional row weights."""
    model = make_pipeline(StandardScaler(), Ridge(1.0) if regression else LogisticRegression(max_iter=3000))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lbfgs convergence chatter on tiny sets
        return model.fit(x, y, **({} if weight is None else {model.steps[-1][0] + "__sample_weight": weight}))


def _output(model: Any, x: np.ndarray, regression: bool) -> np.ndarray:
    """(N,) predictions for regression, else (N, K) logits (log-probabilities up to a per-row constant)."""
    if regression:
        return model.predict(x)
    logits = model.decision_function(x)
    return np.c_[np.zeros(len(x)), logits] if logits.ndim == 1 else logits


def crossfit_outputs(x: np.ndarray, y: np.ndarray, group: np.ndarray, regression: bool = False) -> np.ndarray:
    """Each row's output (see :func:`_output`) from a model fitted on the other groups' rows."""
    classes = 0 if regression else int(y.max()) + 1
    out = np.zeros(len(y)) if regression else np.zeros((len(y), classes))
    for j in np.unique(group):
        fit_rows = group != j
        if len(np.unique(y[fit_rows])) < classes:
            raise StageError(f"crossfit group {j}: the other groups miss a class; use more subjects")
        out[group == j] = _output(fit_probe(x[fit_rows], y[fit_rows], regression), x[group == j], regression)
    return out


def fit_soft_student(
    x: np.ndarray, y: np.ndarray, teacher_out: np.ndarray, *, temperature: float = 4.0, alpha: float = 0.5
) -> Any:
    """Student fitted on ``alpha * label + (1 - alpha) * teacher`` (classification: ``softmax(logits / T)``,
    each row entered once per class weighted by the target's probability; regression: the prediction)."""
    if teacher_out.ndim == 1:
        return fit_probe(x, alpha * y + (1.0 - alpha) * teacher_out, True)
    logits = teacher_out / temperature
    soft = np.exp(logits - logits.max(1, keepdims=True))
    target = alpha * np.eye(teacher_out.shape[1])[y] + (1.0 - alpha) * soft / soft.sum(1, keepdims=True)
    classes = np.repeat(np.arange(target.shape[1]), len(y))
    return fit_probe(np.tile(x, (target.shape[1], 1)), classes, False, target.T.ravel())


def _beyond_label(out: np.ndarray, y: np.ndarray, y_fit: np.ndarray, out_fit: np.ndarray) -> np.ndarray:
    """``out`` minus what the label explains: least squares of ``out_fit`` on the one-hot label (class means),
    or on an affine function of a regression target."""
    classes = np.issubdtype(y_fit.dtype, np.integer)
    design = (lambda v: np.eye(int(y_fit.max()) + 1)[v]) if classes else (lambda v: np.c_[np.ones(len(v)), v])
    return out - design(y) @ np.linalg.lstsq(design(y_fit), out_fit, rcond=None)[0]


def _r2(x_fit: np.ndarray, target_fit: np.ndarray, x_test: np.ndarray, target_test: np.ndarray) -> float:
    model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 4, 13))).fit(x_fit, target_fit)
    return float(r2_score(target_test, model.predict(x_test), multioutput="variance_weighted"))


@dataclass
class Diagnosis:
    """Scores of every run (fold x repeat) and the verdict; :meth:`summary`: means, corrected intervals."""

    metric: str
    subjects: int
    samples: int
    test_train_ratio: float
    names: tuple[list[str], list[str]]
    runs: dict[str, list[float]] = field(default_factory=dict)
    verdict: str = ""

    def summary(self) -> dict[str, dict[str, float]]:
        """Mean, sd and corrected 95 % interval of each score (probes clipped to the metric's range) and of
        the paired differences ``gain`` (soft-label student - student), ``headroom`` (privileged - student)"""
        out = {}
        pairs: dict[str, tuple[str, str | None]] = {**{n: (n, None) for n in self.runs}, **DIFFERENCES}
        for name, (a, b) in pairs.items():
            metric = self.metric if name in PROBES else None
            base = None if b is None else self.runs[b]
            c = corrected_and_naive(self.runs[a], base, 0.95, self.test_train_ratio, metric)
            mean, sd = ("mean", "std") if b is None else ("mean_diff", "std_diff")
            out[name] = {"mean": c[mean], "sd": c[sd], "ci_low": c["ci_low"], "ci_high": c["ci_high"]}
        return out

    def text(self) -> str:
        s, s_runs = self.summary(), self.runs["student"]

        def ci(k: str, f: str = "+.3f") -> str:
            return f"{s[k]['mean']:{f}} [{s[k]['ci_low']:{f}}, {s[k]['ci_high']:{f}}]"

        student, privileged = (", ".join(n) or "?" for n in self.names)
        lines = [
            f"verdict: {self.verdict} (gain {ci('gain')}, R² beyond the label "
            f"{s['r2_beyond_label']['mean']:+.2f}; {self.subjects} subjects, {len(s_runs)} runs)",
            f"  {self.metric} on test subjects: student ({student}) {ci('student', '.3f')}, privileged "
            f"({privileged}) {ci('privileged', '.3f')}, both {ci('both', '.3f')}",
            f"  head-room privileged - student {ci('headroom')}; soft-label student "
            f"{ci('soft_label_student', '.3f')}, gain over labels {ci('gain')}",
            f"  privileged output from the student view: R² {ci('r2_output', '+.2f')}, beyond the label "
            f"{ci('r2_beyond_label', '+.2f')}",
            "  (means with 95 % Nadeau-Bengio corrected intervals over subject folds x repeats)",
            f"  rule: {RULE}",
        ]
        return "\n".join(lines)


def decide(subjects: int, summary: dict[str, dict[str, float]]) -> str:
    """The module's verdict rule."""
    if subjects < MIN_SUBJECTS:
        return "too few subjects to tell"
    if summary["gain"]["ci_low"] > 0:
        return "can help"
    if summary["gain"]["ci_high"] < MARGIN or summary["r2_beyond_label"]["mean"] < MIN_TRANSFER_R2:
        return "unlikely to help"
    return "too few subjects to tell"


def diagnose(
    views: Views,
    *,
    folds: int = 5,
    repeats: int = 3,
    crossfit_groups: int = 3,
    temperature: float = 4.0,
    alpha: float = 0.5,
) -> Diagnosis:
    """The module's measurements and verdict on ``views``, over ``folds`` x ``repeats`` subject folds."""
    subject = np.asarray(views.subject)
    names = np.unique(subject)
    if len(names) < max(4, crossfit_groups + 1):
        raise StageError(f"diagnose: needs at least {max(4, crossfit_groups + 1)} subjects, got {len(names)}")
    regression = views.regression
    y = np.asarray(views.target, float) if regression else np.unique(views.target, return_inverse=True)[1]
    x = {"student": np.asarray(views.student), "privileged": np.asarray(views.privileged)}
    x["both"] = np.c_[x["student"], x["privileged"]]
    runs: dict[str, list[float]] = {}
    ratios = []
    for rep in range(repeats):
        splitter = (GroupKFold if regression else StratifiedGroupKFold)(
            min(folds, len(names)), shuffle=True, random_state=rep
        )
        for train, test in splitter.split(x["student"], y, subject):
            rng = np.random.default_rng([rep, int(test[0])])
            one = _one_run(x, y, subject, train, test, regression, rng, crossfit_groups, temperature, alpha)
            for name, value in one.items():
                runs.setdefault(name, []).append(value)
            ratios.append(len(test) / len(train))
    metric = "ccc" if regression else "accuracy"
    result = Diagnosis(metric, len(names), len(y), float(np.mean(ratios)), views.names, runs)
    result.verdict = decide(result.subjects, result.summary())
    return result


def _one_run(x, y, subject, train, test, regression, rng, groups, temperature, alpha) -> dict[str, float]:
    """The scores of one (fold, repeat): the probes, the soft-label student and the transfer R²."""

    def score(model: Any, view: str) -> float:
        pred = model.predict(x[view][test])
        return ccc(y[test], pred) if regression else float((pred == y[test]).mean())

    models = {name: fit_probe(view[train], y[train], regression) for name, view in x.items()}
    train_subjects = np.unique(subject[train])
    group_of = dict(zip(train_subjects, rng.permutation(len(train_subjects)) % groups, strict=True))
    group = np.array([group_of[s] for s in subject[train]])
    out_fit = crossfit_outputs(x["privileged"][train], y[train], group, regression)
    soft = fit_soft_student(x["student"][train], y[train], out_fit, temperature=temperature, alpha=alpha)
    centred = lambda out: out - out.mean(1, keepdims=True) if out.ndim == 2 else out  # noqa: E731
    fit_, test_ = centred(out_fit), centred(_output(models["privileged"], x["privileged"][test], regression))
    beyond = [_beyond_label(logit, y[rows], y[train], fit_) for logit, rows in ((fit_, train), (test_, test))]
    return {
        **{name: score(model, name) for name, model in models.items()},
        "soft_label_student": score(soft, "student"),
        "r2_output": _r2(x["student"][train], fit_, x["student"][test], test_),
        "r2_beyond_label": _r2(x["student"][train], beyond[0], x["student"][test], beyond[1]),
    }


def table_views(path: str | Path, student: Sequence[str] = (), privileged: Sequence[str] = ()) -> Views:
    """A feature table's views; by default the first list column is the student's, the others privileged."""
    if not Path(path).is_file():
        raise DatasetError(f"table {path} does not exist (expected a Parquet feature table)")
    table = pq.read_table(path)
    lists = [f.name for f in table.schema if str(f.type).startswith(("list", "large_list", "fixed_size"))]
    student = list(student) or lists[:1]
    privileged = list(privileged) or [c for c in lists if c not in student]
    if missing := [c for c in ("subject_id", *student, *privileged) if c not in table.column_names]:
        raise DatasetError(f"table {path}: no column {missing[0]!r} (columns: {table.column_names})")
    if not student or not privileged:
        raise DatasetError(f"table {path}: needs a student and a privileged list column, found {lists}")
    regression = "target" in table.column_names
    if not regression and "label" not in table.column_names:
        raise DatasetError(f"table {path}: expected a 'label' (classes) or 'target' (regression) column")
    stack = lambda cols: np.hstack([np.asarray(table[c].to_pylist(), np.float64) for c in cols])  # noqa: E731
    target = np.asarray(table["target" if regression else "label"].to_pylist())
    subject = np.asarray(table["subject_id"].to_pylist())
    return Views(stack(student), stack(privileged), target, subject, regression, (student, privileged))


def run_views(run: str | Path, student: Sequence[str] = (), privileged: Sequence[str] = ()) -> Views:
    """The views of a run directory's ``features/`` tables (by default the modalities of its ``config.yaml``):
    video as each clip's mean grey frame, other modalities' default tensor flattened; each reduced to
    :data:`MAX_DIMS` dimensions by PCA (fitted on all rows, no labels)."""
    rd = RunDir(run)
    data = load_config(rd.config).data
    manifest = read_manifest(rd.manifest)
    order = manifest["sample_id"].tolist()

    def view(modalities: Sequence[str]) -> np.ndarray:
        parts = []
        for modality in modalities:
            path, ids, rows = rd.feature_table(modality), [], []
            for batch_ids, arr in iter_tensors(path, DEFAULT_TENSOR.get(modality, "vector")):
                flat = arr.astype(np.float32).mean(axis=(1, 4)) if modality == "video" else arr
                ids += batch_ids
                rows.append(flat.reshape(len(batch_ids), -1))
            row_of = {sample: i for i, sample in enumerate(ids)}
            if missing := [sample for sample in order if sample not in row_of]:
                raise DatasetError(
                    f"{path}: no features for {len(missing)} manifest samples ({missing[:3]}...)"
                )
            x = np.concatenate(rows)[[row_of[sample] for sample in order]]
            dims = min(MAX_DIMS, len(x))
            parts.append(PCA(dims, random_state=0).fit_transform(x) if x.shape[1] > dims else x)
        return np.hstack(parts)

    student = list(student) or list(data.student_modalities)
    privileged = list(privileged) or list(data.privileged_modalities)
    target, subject = manifest[data.target_column].to_numpy(), manifest["subject_id"].to_numpy()
    return Views(view(student), view(privileged), target, subject, data.is_regression, (student, privileged))


def write_outputs(result: Diagnosis, out_dir: str | Path) -> tuple[Path, Path]:
    """``diagnose.json`` and ``diagnose.png`` (the probes and differences with their corrected intervals)."""
    import matplotlib.pyplot as plt

    from pkdot.evaluate.plots import _save

    out_dir = Path(out_dir)
    s = result.summary()
    atomic_write_json(out_dir / "diagnose.json", {**asdict(result), "summary": s, "rule": RULE})
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), gridspec_kw={"width_ratios": [4, 2]})
    for ax, names in zip(axes, (PROBES, tuple(DIFFERENCES)), strict=True):
        means = np.array([s[n]["mean"] for n in names])
        err = np.abs(np.array([[s[n]["ci_low"] for n in names], [s[n]["ci_high"] for n in names]]) - means)
        ax.bar(range(len(names)), means, yerr=err, capsize=4, color=[f"C{i}" for i in range(len(names))])
        ax.set_xticks(range(len(names)), [n.replace("_", "\n") for n in names], fontsize=8)
    axes[1].axhline(0.0, color="k", lw=0.6)
    axes[1].set_ylabel("paired difference", fontsize=8)
    axes[0].set_ylabel(f"{result.metric}, test subjects (95 % corrected CI)", fontsize=8)
    fig.suptitle(f"{result.verdict} ({result.subjects} subjects)", fontsize=10)
    return out_dir / "diagnose.json", _save(fig, out_dir / "diagnose.png")
