"""Stage 5: evaluate a run directory and write ``RUN/report/``.

Reads every ``predictions.parquet`` and ``history.json`` of ``RUN/teacher/`` and ``RUN/student/``; writes
``report.md`` (short whatever the number of folds), ``summary.json`` (the same numbers, NaN as null, uncorrected
intervals as ``naive_*``), ``per_fold.csv`` (one row per model, fold and seed), ``robustness.csv``
(``--robustness``) and the figures of :mod:`pkdot.evaluate.plots`, each written atomically."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pkdot.config import RunConfig
from pkdot.data.affwild2 import challenge_markdown, challenge_scores
from pkdot.data.manifest import read_manifest
from pkdot.errors import ConfigError, StageError
from pkdot.evaluate import aggregate as agg
from pkdot.evaluate.plots import (
    plot_confusion_matrices,
    plot_embedding_map,
    plot_learning_curves,
    plot_metric_bars,
    plot_robustness,
    plot_structure,
)
from pkdot.evaluate.robustness import run_robustness, summarise_robustness
from pkdot.folds import describe_protocol
from pkdot.rundir import RunDir, atomic_write_text

logger = logging.getLogger(__name__)

CONFIDENCE_LEVEL = 0.95
PKDOT_STUDENT = "student-pkdot"


@dataclass
class EvaluationSummary:
    """What :func:`evaluate_run` computed and wrote. ``paired``: each student loss minus ``student-none``, by
    (fold, seed); ``teacher_vs_unimodal``: ``teacher`` minus each ``unimodal-*``; ``test_train_ratio``: the
    correction's n_test/n_train; ``challenge``: Aff-Wild2's per-frame CCC per run; ``notes``: figures not drawn."""

    table: pd.DataFrame
    paired: pd.DataFrame
    per_fold: pd.DataFrame
    report_path: Path
    plots: list[Path]
    best_student: str | None
    teacher_vs_unimodal: pd.DataFrame = field(default_factory=pd.DataFrame)
    summary_path: Path | None = None
    notes: list[str] = field(default_factory=list)
    test_train_ratio: float = math.nan
    ratio_source: str = ""
    num_classes: int | None = None
    robustness: pd.DataFrame | None = None
    protocol: str = ""
    challenge: pd.DataFrame = field(default_factory=pd.DataFrame)
    selection: agg.Selection | None = None


# ---- histories and embeddings ------------------------------------------------------------------------------
def collect_histories(run_dir: Path, models: list[str]) -> dict[str, list[list[dict[str, float]]]]:
    """Learning curves of the run: {model: [epoch records of each (fold, seed)]}, for ``models`` only. A
    ``history.json`` with ``phases`` names its models; otherwise its ``epochs`` belong to the job's model."""
    rd = RunDir(run_dir)
    files = [(p, "teacher") for p in sorted(rd.teachers.glob("fold-*/seed-*/history.json"))]
    files += [
        (p, f"student-{p.parents[2].name}") for p in sorted(rd.students.glob("*/fold-*/seed-*/history.json"))
    ]
    found: dict[str, list[list[dict[str, float]]]] = {}
    for path, default_model in files:
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise StageError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(doc, dict):
            raise StageError(f"{path}: expected a JSON object with 'epochs' (docs/interfaces.md)")
        if isinstance(phases := doc.get("phases"), dict) and phases:
            runs = {name: p.get("epochs") if isinstance(p, dict) else None for name, p in phases.items()}
            if bad := [name for name, epochs in runs.items() if not isinstance(epochs, list)]:
                raise StageError(f"{path}: phases.{bad[0]}.epochs must be a list of epoch records")
        else:
            runs = {default_model: doc.get("epochs")}
            if not isinstance(runs[default_model], list):
                raise StageError(f"{path}: expected 'epochs' (a list of epoch records) or 'phases'")
        for model, epochs in runs.items():
            if model in models:
                if not all(isinstance(rec, dict) and "epoch" in rec for rec in epochs):
                    raise StageError(f"{path}: every epoch record of {model!r} needs an 'epoch' field")
                found.setdefault(model, []).append(epochs)
    return {m: found[m] for m in models if m in found}


def matched_test_embeddings(
    pred: pd.DataFrame, teacher: str, student: str
) -> tuple[pd.DataFrame, tuple[int, int]]:
    """Test rows of ``teacher`` and ``student`` for the first (fold, seed) both have, matched by sample_id: a
    frame of ``sample_id``, ``y_true``, ``teacher_embedding``, ``student_embedding`` (sorted by label, then sample
    id) and the (fold, seed) used."""
    test = pred[pred["split"] == "test"]
    t_runs, s_runs = (
        set(test.loc[test["model"] == m, ["fold", "seed"]].itertuples(index=False, name=None))
        for m in (teacher, student)
    )
    if not (common := sorted(t_runs & s_runs)):
        raise StageError(f"{teacher} and {student} have no (fold, seed) with test predictions in common")
    fold, seed = (int(v) for v in common[0])
    sel = test[(test["fold"] == fold) & (test["seed"] == seed)]
    t = sel.loc[sel["model"] == teacher, ["sample_id", "y_true", "embedding"]]
    s = sel.loc[sel["model"] == student, ["sample_id", "embedding"]]
    merged = t.rename(columns={"embedding": "teacher_embedding"}).merge(
        s.rename(columns={"embedding": "student_embedding"}), on="sample_id"
    )
    if merged.empty:
        raise StageError(f"{teacher} and {student} share no test sample ids in fold {fold} seed {seed}")
    return merged.sort_values(["y_true", "sample_id"], ignore_index=True), (fold, seed)


def _stack(column: pd.Series, what: str) -> np.ndarray:
    rows = [np.asarray(v, dtype=np.float32) for v in column]
    lengths = {r.shape for r in rows}
    if len(lengths) != 1 or rows[0].ndim != 1 or rows[0].size == 0:
        raise StageError(
            f"{what}: embeddings must be non-empty vectors of one length, got shapes {sorted(lengths)}"
        )
    return np.stack(rows)


# ---- formatting --------------------------------------------------------------------------------------------
def _fmt(x: Any, digits: int = 3, sign: str = "") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:{sign}.{digits}f}"


def _fmt_p(p: float) -> str:
    return "n/a" if math.isnan(p) else "< 0.001" if p < 0.001 else f"{p:.3f}"


def _ci(r: Any) -> str:
    """``[ci_low, ci_high]`` of a table row."""
    return f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _difference_table(diffs: pd.DataFrame, first: str, metric: str, name: Any) -> str:
    """A paired-difference table, one row per row of ``diffs`` (``name(row)``: its first cell)."""
    rows = []
    for _, r in diffs.iterrows():
        diff, low, high = (_fmt(float(r[k]), 4, "+") for k in ("mean_diff", "ci_low", "ci_high"))
        rows.append([name(r), diff, f"[{low}, {high}]", _fmt_p(float(r["p_value"])), str(int(r["n"]))])
    return _md_table([first, f"Δ {metric}", "95% CI (corrected)", "p (corrected paired t)", "n"], rows)


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """DataFrame -> JSON-ready records (numpy scalars to Python, NaN to None)."""
    df = df.replace([np.inf, -np.inf], np.nan)
    return df.astype(object).where(df.notna(), None).to_dict("records")


def pkdot_sentence(paired: pd.DataFrame, metric: str) -> str:
    """One sentence stating PKDOT's measured difference to ``student-none`` and whether its CI excludes 0."""
    row = paired[paired["model"] == PKDOT_STUDENT]
    if row.empty:
        return f"PKDOT was not compared with `{agg.BASELINE_STUDENT}` in this run (one of them is missing)."
    r = row.iloc[0]
    diff, low, high, n = float(r["mean_diff"]), float(r["ci_low"]), float(r["ci_high"]), int(r["n"])
    if n == 0 or math.isnan(diff):
        return f"PKDOT and `{agg.BASELINE_STUDENT}` share no (fold, seed) run, so no paired difference was measured."
    if n == 1:
        verdict = "with a single run there is no interval, so this is not evidence either way"
    elif low > 0:
        verdict = "the interval excludes 0: a gain for PKDOT"
    elif high < 0:
        verdict = "the interval excludes 0: PKDOT is worse than no distillation here"
    else:
        verdict = "the interval includes 0: no significant difference in this run"
    return (
        f"Measured: PKDOT changed the test {metric} by {_fmt(diff, 4, '+')} relative to the student trained "
        f"without distillation (corrected 95% CI [{_fmt(low, 4, '+')}, {_fmt(high, 4, '+')}], corrected "
        f"paired t-test p = {_fmt_p(float(r['p_value']))}, n = {n} fold x seed runs); {verdict}."
    )


def _num_classes(cfg: RunConfig, pred: pd.DataFrame | None = None) -> int:
    """``cfg.data.num_outputs``; for a table run whose classes were not yet written into the config, the length
    of the stored class scores (every prediction row has one score per class)."""
    try:
        return int(cfg.data.num_outputs)
    except ConfigError:
        if pred is None or pred.empty:
            raise
        lengths = {len(v) for v in pred["scores"]}
        if len(lengths) != 1:
            raise StageError(f"predictions: class scores of different lengths {sorted(lengths)}") from None
        n = lengths.pop()
        logger.info("data.num_classes not set: %d classes, from the length of the predicted scores", n)
        return n


def robustness_lines(robustness: pd.DataFrame, metric: str) -> list[str]:
    """A compact table: one row per model and perturbation, one column per level (mean [corrected CI])."""
    lines = [
        "## Robustness of the video models to degraded test video",
        "",
        "Test clips perturbed before the video backbone (the face crops); every model re-encodes them. "
        "Frame drop: that fraction of frames removed and the clip re-sampled to its length from the frames "
        "kept (nearest frame). Noise: Gaussian pixel noise of that standard deviation (0-255 scale). "
        f"Blur: Gaussian blur of that sigma in pixels. Cells: test {metric}, mean [corrected 95% CI] over "
        "runs; all rows in [robustness.csv](robustness.csv).",
        "",
    ]
    for perturbation, g in robustness.groupby("perturbation", sort=False):
        levels = sorted(set(g["level"]))
        rows = []
        for model, gm in g.groupby("model", sort=False):
            by_level = gm.set_index("level")
            cells = [
                f"{_fmt(by_level.loc[lv, 'mean'])} {_ci(by_level.loc[lv])}" if lv in by_level.index else "n/a"
                for lv in levels
            ]
            rows.append([f"`{model}`", *cells])
        lines += [_md_table(["model", *[f"{perturbation} {lv:g}" for lv in levels]], rows), ""]
    return lines


_LEAKS = {
    "train.folds=clips": "folds drawn over clips, ignoring subjects (the same subjects are in training and test)",
    "train.select_on=test": "every epoch selected on the test fold (so is every choice 'on validation' below)",
    "train.teacher_scope=all": "each fold's teacher trained with that fold's test samples",
}


def protocol_banner(cfg: RunConfig) -> list[str]:
    """The report's first lines when the run uses an authors'-protocol switch (``train.folds: clips``,
    ``train.select_on: test``, ``train.teacher_scope: all``); none otherwise."""
    if not (switches := cfg.train.optimistic_switches):
        return []
    said = "; ".join(f"`{s}`: {_LEAKS[s]}" for s in switches)
    return [f"> **Optimistic by construction; for comparison with published numbers only.** {said}.", ""]


#: The report's title of each figure file.
FIGURE_TITLES = {
    "robustness.png": "Robustness to degraded test video (mean and corrected 95% CI over runs)",
    "metric_bars.png": "Test metric with confidence intervals",
    "confusion_matrices.png": "Confusion matrices",
    "learning_curves.png": "Learning curves",
    "structure.png": "Teacher vs student similarity structure and OT plan",
    "embeddings.png": "Embedding map (PCA)",
}


def render_report(cfg: RunConfig, summary: EvaluationSummary, plot_names: list[str], n_files: int) -> str:
    """The Markdown text of ``report.md`` (a summary: per-run numbers are in ``per_fold.csv``)."""
    regression = cfg.data.is_regression
    metric = agg.primary_metric(regression)
    table = summary.table
    kind = f"classification, {summary.num_classes} classes, metric accuracy and macro-F1"
    kind = "regression, metrics CCC, MAE and RMSE" if regression else kind
    part = f" (part {cfg.data.part})" if cfg.data.dataset == "biovid" else ""
    lines = [
        *protocol_banner(cfg),
        f"# PKDOT evaluation: {cfg.name}",
        "",
        f"- Dataset: **{cfg.data.dataset}**{part}; task: **{cfg.data.task}** ({kind})",
        f"- Preset: `{cfg.preset}`; folds: {cfg.train.folds} (evaluated: {summary.per_fold['fold'].nunique()}); "
        f"seeds: {cfg.train.seeds}",
        *([f"- Protocol: {summary.protocol}"] if summary.protocol else []),
        f"- Modalities: student {cfg.data.student_modalities}, privileged (teacher only) "
        f"{cfg.data.privileged_modalities}",
        f"- Config hash: `{cfg.section_hash()}`",
        f"- Source: {n_files} predictions files; every score is computed on the test subjects of one (fold, seed) "
        "run, then averaged over runs (n = runs).",
        f"- Statistics: intervals and p-values over runs use the {agg.CORRECTION_NAME} (Nadeau & Bengio 2003), "
        f"for runs whose training sets overlap: `{agg.CORRECTION_FORMULA}`; here n_test/n_train = "
        f"{_fmt(summary.test_train_ratio, 4)} ({summary.ratio_source}). "
        "Uncorrected intervals are only in `summary.json` (`naive_*`).",
        f"- {agg.BOUNDS_SENTENCE}",
        "- Per-run scores (one row per model × fold × seed, with n_test, n_train and the validation score): "
        "[per_fold.csv](per_fold.csv).",
        "",
        f"## Test {metric} per model (mean ± std over runs, {int(CONFIDENCE_LEVEL * 100)}% corrected CI)",
        "",
    ]
    if cfg.data.dataset == "affwild2":
        lines += [
            "CCC here is per clip: each clip's prediction against its clip-mean label, over all test clips of "
            "a run (the challenge's per-frame CCC follows the table).",
            "",
        ]
    header = ["model", f"validation {metric} mean", f"test {metric} mean ± std", "95% CI (corrected)"]
    header += [*(["MAE mean", "RMSE mean"] if regression else ["macro-F1 mean ± std"]), "n"]
    rows = []
    for _, r in table.iterrows():
        f1 = f"{_fmt(r.get('macro_f1_mean'))} ± {_fmt(r.get('macro_f1_std'))}"
        extra = [_fmt(r["mae_mean"]), _fmt(r["rmse_mean"])] if regression else [f1]
        row = [f"`{r['model']}`", _fmt(r.get("val_mean")), f"{_fmt(r['mean'])} ± {_fmt(r['std'])}", _ci(r)]
        rows.append([*row, *extra, str(int(r["n"]))])
    lines += [_md_table(header, rows), ""]
    if not summary.challenge.empty:
        lines += challenge_markdown(summary.challenge, cfg.data.task)

    lines += [f"## Distillation losses vs. `{agg.BASELINE_STUDENT}` (paired by fold and seed)", ""]
    if summary.paired.empty:
        lines += [f"No comparison: the run has no `{agg.BASELINE_STUDENT}` or no other student.", ""]
    else:
        lines += [_difference_table(summary.paired, "student", metric, lambda r: f"`{r['model']}`"), ""]
    lines += [pkdot_sentence(summary.paired, metric), "", "## Teacher vs. unimodal models", ""]
    if summary.teacher_vs_unimodal.empty:
        lines += ["The run has no teacher and unimodal predictions to compare.", ""]
    else:
        name = lambda r: f"`teacher` − `{r['baseline']}`"  # noqa: E731
        lines += [
            _difference_table(summary.teacher_vs_unimodal, "comparison", metric, name),
            "",
            "The teacher sees the privileged modalities; the unimodal models are the teacher's backbones "
            "trained alone (the first phase of the teacher stage).",
            "",
        ]

    if (sel := summary.selection) is not None:
        best = table[table["model"] == sel.model].iloc[0]
        lines += [
            "## The student to ship (chosen on validation)",
            "",
            f"Rule: {agg.SELECTION_RULE.format(metric=metric)}. Chosen: `{sel.model}`, mean validation {metric} "
            f"{_fmt(sel.val_mean)}; its registered run is fold {sel.fold}, seed {sel.seed} (the best validation "
            f"{metric} of that loss). Cross-validated estimate of this choice: test {metric} "
            f"{_fmt(best['mean'])} {_ci(best)} (corrected 95% CI, n = {int(best['n'])} runs).",
            "",
        ]
    if summary.robustness is not None and not summary.robustness.empty:
        lines += robustness_lines(summary.robustness, metric)
    lines += ["## Figures", ""]
    for name in plot_names:
        title = FIGURE_TITLES.get(name, name)
        lines += [f"### {title}", "", f"![{title}]({name})", ""]
    lines += [f"- Not drawn: {note}" for note in summary.notes]
    return "\n".join(lines).rstrip() + "\n"


# ---- the stage ---------------------------------------------------------------------------------------------
def _draw_plots(
    cfg: RunConfig, pred: pd.DataFrame, table: pd.DataFrame, run_dir: Path, notes: list[str], num_classes: int
) -> list[Path]:
    regression, out = cfg.data.is_regression, RunDir(run_dir).report
    models = list(table["model"])
    plots = [plot_metric_bars(table, out / "metric_bars.png")]
    if not regression:
        plots.append(plot_confusion_matrices(pred, num_classes, out / "confusion_matrices.png", models))
    if histories := collect_histories(run_dir, models):
        plots.append(
            plot_learning_curves(histories, out / "learning_curves.png", agg.primary_metric(regression))
        )
    else:
        notes.append("learning curves (no history.json files)")
    students = [m for m in models if m.startswith("student-")]
    student = PKDOT_STUDENT if PKDOT_STUDENT in students else next(iter(students), None)
    if "teacher" not in models or student is None:
        notes.append("similarity structure and embedding map (need teacher and student predictions)")
        return plots
    try:
        matched, (fold, seed) = matched_test_embeddings(pred, "teacher", student)
        teacher_emb = _stack(matched["teacher_embedding"], "teacher test embeddings")
        student_emb = _stack(matched["student_embedding"], f"{student} test embeddings")
    except StageError as exc:
        notes.append(f"similarity structure and embedding map ({exc})")
        return plots
    labels = matched["y_true"].to_numpy()
    if (batch := min(cfg.train.batch_size, len(matched))) < 2:
        notes.append(
            f"similarity structure (fold {fold} seed {seed} has {len(matched)} matched test samples)"
        )
    else:
        idx = np.sort(np.random.default_rng(cfg.seed).choice(len(matched), size=batch, replace=False))
        pk = cfg.distill.pkdot.model_dump(include={"k", "anchors", "blur"})
        sub_labels = None if regression else labels[idx]  # rows stay sorted by label
        clouds = (teacher_emb[idx], student_emb[idx], out / "structure.png")
        plots.append(plot_structure(*clouds, labels=sub_labels, student_name=student, **pk))
    if len(matched) >= 2:
        embeddings = {"teacher": teacher_emb, student: student_emb}
        path = out / "embeddings.png"
        plots.append(plot_embedding_map(embeddings, labels, path, regression=regression, seed=cfg.seed))
    return plots


def test_train_sizes(
    cfg: RunConfig, run_dir: Path, pred: pd.DataFrame
) -> tuple[pd.DataFrame | None, float, str]:
    """Per-run ``n_test``/``n_train`` (:func:`~pkdot.evaluate.aggregate.fold_sizes`), their mean ratio and
    where it came from. Without a manifest, the k-fold value ``1/(k-1)`` (``k = train.folds``, or the
    number of folds evaluated), which the report states."""
    if (sizes := agg.fold_sizes(run_dir, pred, cfg.data.modalities)) is not None:
        return sizes, agg.fold_size_ratio(sizes), "counted per run from the manifest and the folds' subjects"
    k = cfg.train.folds if isinstance(cfg.train.folds, int) else int(pred["fold"].nunique())
    if k < 2:
        raise StageError(
            f"{run_dir}: no manifest.parquet to count training samples, and {k} fold(s): cannot set "
            "n_test/n_train for the corrected t interval"
        )
    return None, 1.0 / (k - 1), f"1/(k-1) for k = {k} folds: {RunDir(run_dir).manifest} not found"


def read_summary(rd: RunDir) -> EvaluationSummary:
    """The evaluation a previous :func:`evaluate_run` wrote (``report/summary.json`` and ``per_fold.csv``): what
    the refit stage needs to register the chosen configuration (selection, table, runs, protocol)."""
    try:
        doc = json.loads(rd.summary.read_text())
        per_fold = pd.read_csv(rd.report / "per_fold.csv")
    except (OSError, ValueError) as exc:
        raise StageError(
            f"cannot read the evaluation in {rd.report} ({exc}): re-run `pkdot evaluate`"
        ) from exc
    sel = doc.get("selection")
    return EvaluationSummary(
        table=pd.DataFrame(doc["table"]),
        paired=pd.DataFrame(doc["paired"]),
        per_fold=per_fold,
        report_path=rd.report_md,
        plots=[rd.report / p for p in doc["plots"]],
        best_student=doc["best_student"],
        summary_path=rd.summary,
        protocol=doc.get("protocol") or "",
        selection=None if sel is None else agg.Selection(**sel),
    )


def evaluate_run(
    cfg: RunConfig, run_dir: Path | None = None, *, robustness: bool = False
) -> EvaluationSummary:
    """Evaluate every model of a run (default ``cfg.run_dir``), choose the student to ship on validation and write
    ``RUN/report/``; ``robustness`` adds the degraded-video evaluation (:mod:`pkdot.evaluate.robustness`)."""
    run_dir = Path(run_dir if run_dir is not None else cfg.run_dir)
    rd = RunDir(run_dir)
    regression = cfg.data.is_regression
    metric = agg.primary_metric(regression)
    pred = agg.collect_predictions(run_dir)
    num_classes = _num_classes(cfg, pred)
    n_files = int(pred["source"].nunique())
    sizes, ratio, ratio_source = test_train_sizes(cfg, run_dir, pred)
    stats = {"level": CONFIDENCE_LEVEL, "test_train_ratio": ratio}
    per_fold, table, paired = agg.aggregate(pred, regression=regression, num_classes=num_classes, **stats)
    if sizes is not None:
        per_fold = per_fold.merge(sizes[["fold", "seed", "n_train"]], on=["fold", "seed"], how="left")
    models = list(table["model"])
    unimodal = [m for m in models if m.startswith("unimodal-")] if "teacher" in models else []
    vs_unimodal = [
        agg.paired_table(per_fold, metric=metric, models=["teacher"], baseline=u, **stats) for u in unimodal
    ]
    teacher_vs_unimodal = (
        pd.concat(vs_unimodal, ignore_index=True) if unimodal else pd.DataFrame(columns=agg.PAIRED_COLUMNS)
    )
    selection = agg.select_student(per_fold, metric, cfg.distill.losses)
    best_student = None if selection is None else selection.model
    protocol = describe_protocol(cfg.train.folds, rd.splits) if rd.splits.is_file() else ""
    challenge = pd.DataFrame()  # Aff-Wild2: the challenge's per-frame CCC of every run
    if cfg.data.dataset == "affwild2" and cfg.data.root is not None:
        challenge = challenge_scores(read_manifest(rd.manifest), pred, Path(cfg.data.root), cfg.data.task)
    robustness_runs = robustness_table = None
    if robustness:
        robustness_runs = run_robustness(cfg, run_dir)
        robustness_table = summarise_robustness(robustness_runs, metric=metric, **stats)
    notes: list[str] = []
    plots = _draw_plots(cfg, pred, table, run_dir, notes, num_classes)
    if robustness_table is not None:
        plots.append(plot_robustness(robustness_table, rd.report / "robustness.png", metric=metric))
    summary = EvaluationSummary(
        table=table,
        paired=paired,
        per_fold=per_fold,
        report_path=rd.report_md,
        plots=plots,
        best_student=best_student,
        teacher_vs_unimodal=teacher_vs_unimodal,
        summary_path=rd.summary,
        notes=notes,
        protocol=protocol,
        challenge=challenge,
        test_train_ratio=ratio,
        ratio_source=ratio_source,
        num_classes=None if regression else num_classes,
        robustness=robustness_table,
        selection=selection,
    )
    plot_names = [p.name for p in plots]
    summary_doc = {
        "name": cfg.name,
        "dataset": cfg.data.dataset,
        "task": cfg.data.task,
        "preset": cfg.preset,
        "regression": regression,
        "metric": metric,
        "confidence_level": CONFIDENCE_LEVEL,
        "statistics": {
            "correction": agg.CORRECTION_NAME,
            "formula": agg.CORRECTION_FORMULA,
            "test_train_ratio": ratio,
            "ratio_source": ratio_source,
            "bounds": agg.BOUNDS_SENTENCE,
        },
        "config_hash": cfg.section_hash(),
        "best_student": best_student,
        "selection": None if selection is None else _records(pd.DataFrame([vars(selection)]))[0],
        "selection_rule": agg.SELECTION_RULE.format(metric=metric),
        "table": _records(table),
        "paired": _records(paired),
        "teacher_vs_unimodal": _records(teacher_vs_unimodal),
        "plots": plot_names,
        "notes": notes,
        "predictions_files": n_files,
        "robustness": None if robustness_table is None else _records(robustness_table),
        "protocol": protocol,
        "challenge_frame_ccc": _records(challenge),
    }
    tables = {"per_fold.csv": per_fold, "robustness.csv": robustness_runs, "challenge_ccc.csv": challenge}
    for name, frame in tables.items():
        if frame is not None and not frame.empty:
            atomic_write_text(rd.report / name, frame.to_csv(index=False))
    atomic_write_text(rd.summary, json.dumps(summary_doc, indent=1, allow_nan=False))
    atomic_write_text(rd.report_md, render_report(cfg, summary, plot_names, n_files))
    for stale in rd.report.glob("*.png"):
        if stale.name not in plot_names:
            logger.info("removing %s (not produced by this evaluation)", stale)
            stale.unlink()
    logger.info("report: %s (best student: %s)", summary.report_path, best_student)
    return summary
