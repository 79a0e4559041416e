r"""Protocol benchmark: how much of a published distillation gain can the authors' protocol create? (issue 25)

The authors' public code differs from our protocol in three ways that each make scores optimistic; pkdot has
each as a switch (off by default, never in a preset, flagged at the top of every report that uses one):

- ``train.folds: clips`` -- stratified folds over *samples*, ignoring subjects (the same people are in a fold's
  training and test samples);
- ``train.select_on: test`` -- each model's epoch is chosen on the fold's *test* part;
- ``train.teacher_scope: all`` -- the teacher is trained with the fold's test samples too.

For one data set this benchmark trains the video-only (student-view-only) student without distillation
(``none``), with logit distillation (``kd``) and with PKDOT (``pkdot``), over ``folds x seeds`` runs (each seed
draws its own folds), under five protocols: the sound one (subject k-fold, selection on validation subjects, a
teacher per fold), each switch alone, and the three together. Everything else -- data (fixed data seed 0),
preset, recipe, cell (the paper's: frozen teacher backbone, targets of the fitted teacher) -- is the same. A
protocol is one run of :func:`quality.run_task` with the switch added to its overrides, so the runs, the
per-run metrics and the Nadeau-Bengio corrected intervals (:mod:`pkdot.evaluate.aggregate`) are those of the
quality benchmark.

The table gives per protocol each model's mean accuracy with its corrected interval, and Δ kd − none and
Δ pkdot − none paired by (fold, seed) with corrected intervals; a second table gives the *inflation* over the
sound protocol -- of each model's accuracy, and of the kd − none and pkdot − none gaps -- per run (fold, seed),
so each leak's share is read off its own row (and the sum of the three single-switch rows is set beside the
row with all three).

Data sets: ``--data video`` (synthetic Biovid video, BL1 vs PA4, coupling 1, the demo preset's size: 10 subjects
x 8 windows per class) and ``--data features`` (the synthetic Biovid feature table at Part A's size, 87 subjects
x 20 windows per class, coupling 1, as ``quality.py``'s ``features`` task).

Usage::

    python benchmarks/protocol.py --data features                  # 5 folds x 5 seeds -> results/protocol.md
    python benchmarks/protocol.py --data video --seeds 3           # -> results/protocol-video.md
    python benchmarks/protocol.py --data features --quick --work-dir /tmp/p   # tiny sizes (the smoke test)
    # more seeds later, in another work dir, with the first runs' settings; then one table over all of them
    python benchmarks/protocol.py --data video --seeds 2 --first-seed 3 --work-dir D2 [--set KEY=VALUE ...]
    python benchmarks/protocol.py --data video --work-dir D1 --report-only --pool-with D2
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402  (the benchmarks folder is not a package)
    RESULTS_DIR,
    fmt_float,
    machine_info,
    machine_markdown,
    markdown_table,
    quiet_environment,
    write_result,
)
from quality import (  # noqa: E402
    BASE_CELL,
    TASKS,
    QualitySettings,
    RunResult,
    format_stage_seconds,
    pooled_run,
    run_task,
)

from pkdot.config import parse_override  # noqa: E402
from pkdot.errors import ConfigError  # noqa: E402
from pkdot.evaluate.aggregate import CORRECTION_NAME, paired_difference  # noqa: E402
from pkdot.evaluate.report import protocol_banner  # noqa: E402
from pkdot.rundir import RunDir  # noqa: E402

logger = logging.getLogger(__name__)

#: The losses every protocol trains (the students compared).
LOSSES = ("none", "kd", "pkdot")
STUDENTS = tuple(f"student-{loss}" for loss in LOSSES)
#: ``--data`` -> the quality benchmark's task (its data set, views, coupling and recipe).
DATA_TASKS = {"video": "binary", "features": "features"}
#: The banner of a report made with a switch (:func:`pkdot.evaluate.report.protocol_banner`).
BANNER = "Optimistic by construction; for comparison with published numbers only."


@dataclass(frozen=True)
class Protocol:
    """An evaluation protocol: the authors'-protocol switches it sets (dotted config overrides)."""

    name: str
    switches: tuple[tuple[str, Any], ...]
    description: str

    @property
    def sound(self) -> bool:
        return not self.switches


PROTOCOLS: tuple[Protocol, ...] = (
    Protocol(
        "sound",
        (),
        "subject k-fold; epochs selected on validation subjects carved from each fold's training subjects; a "
        "teacher per fold, trained on the fold's training subjects",
    ),
    Protocol(
        "clips",
        (("train.folds", "clips"),),
        "stratified 5-fold over samples, ignoring subjects (the same people in training and test)",
    ),
    Protocol(
        "select-on-test",
        (("train.select_on", "test"),),
        "every model's epoch selected on the fold's test part (training part as in `sound`)",
    ),
    Protocol(
        "teacher-all",
        (("train.teacher_scope", "all"),),
        "the teacher (and the unimodal models it is built from) trained with the fold's test samples too",
    ),
    Protocol(
        "authors",
        (("train.folds", "clips"), ("train.select_on", "test"), ("train.teacher_scope", "all")),
        "all three switches together (the authors' protocol)",
    ),
)
PROTOCOL_NAMES = tuple(p.name for p in PROTOCOLS)
SINGLE_SWITCHES = tuple(p.name for p in PROTOCOLS if len(p.switches) == 1)


@dataclass
class ProtocolSettings(QualitySettings):
    """One protocol's settings: :class:`quality.QualitySettings` plus the protocol's switches."""

    switches: tuple[tuple[str, Any], ...] = ()
    #: ``--set`` overrides, the same for every protocol (e.g. the settings of an earlier run to pool with)
    extra: tuple[tuple[str, Any], ...] = ()

    def overrides(
        self, spec: Any, run_dir: Path, cell: tuple[str, str], losses: Sequence[str]
    ) -> dict[str, Any]:
        over = super().overrides(spec, run_dir, cell, losses)
        over.update(dict(self.extra))
        over.update(dict(self.switches))  # train.folds: clips replaces the subject k-fold
        return over


@dataclass
class ProtocolReport:
    """What :func:`run_protocols` measured: per protocol its run (``None``: it failed, see ``failures``)."""

    data: str
    seeds: int
    folds: int
    quick: bool
    runs: dict[str, RunResult]
    wall_s: dict[str, float]
    failures: dict[str, str] = field(default_factory=dict)

    @property
    def total_s(self) -> float:
        return float(sum(self.wall_s.values()))


def protocol_settings(
    protocol: Protocol,
    *,
    seeds: int,
    folds: int,
    subjects: int,
    quick: bool,
    work_dir: Path,
    report_only: bool = False,
    first_seed: int = 0,
    extra: Sequence[tuple[str, Any]] = (),
) -> ProtocolSettings:
    """The quality benchmark's settings for one protocol: base cell only, losses :data:`LOSSES`, its own
    run directories (``work_dir/<protocol>``)."""
    return ProtocolSettings(
        tasks=(),
        seeds=seeds,
        first_seed=first_seed,
        subjects=subjects,
        folds=folds,
        grid=False,
        quick=quick,
        work_dir=work_dir / protocol.name,
        base_losses=LOSSES,
        switches=protocol.switches,
        extra=tuple(extra),
        report_only=report_only,
    )


def run_protocols(
    data: str,
    *,
    seeds: int = 5,
    folds: int = 5,
    subjects: int = 10,
    quick: bool = False,
    work_dir: Path = Path("runs/bench-protocol"),
    protocols: Sequence[str] = PROTOCOL_NAMES,
    report_only: bool = False,
    first_seed: int = 0,
    pool_with: Sequence[Path] = (),
    extra: Sequence[tuple[str, Any]] = (),
) -> ProtocolReport:
    """Run (or resume: stages are idempotent) every protocol of ``protocols`` on ``data``; ``report_only``: only
    read the runs an earlier call finished (a protocol with none is reported as failed); ``pool_with``: work
    dirs of earlier calls with other seeds (``first_seed``), whose runs are read too and pooled with these
    (:func:`quality.pooled_run`: every (fold, seed) run in one table).

    The protocols read one data set (written by the first run, then shared). A protocol whose run fails is
    recorded in ``failures``; the others still run.
    """
    if data not in DATA_TASKS:
        raise ConfigError(f"--data {data!r}: expected one of {sorted(DATA_TASKS)}")
    unknown = [p for p in protocols if p not in PROTOCOL_NAMES]
    if unknown:
        raise ConfigError(f"--protocols: unknown {unknown} (expected some of {list(PROTOCOL_NAMES)})")
    quiet_environment()
    spec = TASKS[DATA_TASKS[data]]
    work_dir = Path(work_dir) / data
    data_roots: dict[str, Path] = {}
    runs: dict[str, RunResult] = {}
    wall: dict[str, float] = {}
    failures: dict[str, str] = {}
    for protocol in (p for p in PROTOCOLS if p.name in protocols):
        settings = protocol_settings(
            protocol,
            seeds=seeds,
            folds=folds,
            subjects=subjects,
            quick=quick,
            work_dir=work_dir,
            report_only=report_only,
            first_seed=first_seed,
            extra=extra,
        )
        print(f"[protocol] {data}: {protocol.name} ({protocol.description})", flush=True)
        start = time.perf_counter()
        try:
            result = run_task(spec, settings, data_roots, cells=(BASE_CELL,))
            if pool_with:
                more = [
                    run_task(
                        spec, replace(settings, work_dir=Path(d) / data / protocol.name), {}, (BASE_CELL,)
                    )
                    for d in pool_with
                ]
                result.runs[BASE_CELL] = pooled_run([result.base, *(r.base for r in more)])
        except Exception as exc:  # any stage's error (pkdot's, Ray's, MLflow's): reported, the next one runs
            logger.exception("protocol %s failed", protocol.name)
            failures[protocol.name] = f"{type(exc).__name__}: {exc}"
            continue
        finally:
            wall[protocol.name] = time.perf_counter() - start
        runs[protocol.name] = result.base
        print(f"[protocol] {data}: {protocol.name} done in {wall[protocol.name]:.0f} s", flush=True)
    seeds_read = {len(run.cfg.train.seeds) for run in runs.values()}
    return ProtocolReport(data, max(seeds_read, default=seeds), folds, quick, runs, wall, failures)


# ---- tables ----------------------------------------------------------------------------------------------------
def report_flagged(run: RunResult) -> bool:
    """Whether the run's own ``report.md`` opens with the optimistic-protocol banner."""
    path = RunDir(run.cfg.run_dir).report_md
    return path.is_file() and BANNER in path.read_text().split("\n", 1)[0]


def _runs(run: RunResult, model: str) -> pd.Series:
    pf = run.per_fold
    return pf[pf["model"] == model].set_index(["fold", "seed"])[run.metric].sort_index()


def _diff(values: pd.Series, baseline: pd.Series, ratio: float) -> dict[str, float]:
    """:func:`pkdot.evaluate.aggregate.paired_difference` of two per-run series on the runs both have."""
    common = values.index.intersection(baseline.index).sort_values()
    if len(common) == 0:
        return {"mean_diff": math.nan, "ci_low": math.nan, "ci_high": math.nan, "p_value": math.nan, "n": 0}
    d = paired_difference(
        values.loc[common].to_numpy(), baseline.loc[common].to_numpy(), test_train_ratio=ratio
    )
    return {k: float(d[k]) for k in ("mean_diff", "ci_low", "ci_high", "p_value", "n")}


def protocol_table(report: ProtocolReport) -> pd.DataFrame:
    """One row per protocol: each model's mean and corrected interval (``<model>``, ``<model>_low``,
    ``<model>_high`` for the teacher and the students), Δ kd − none and Δ pkdot − none paired by (fold, seed)
    with corrected intervals and p (``kd_gap*``, ``pkdot_gap*``), ``n``, ``test_train_ratio`` and
    ``flagged`` (the run's report carries the banner)."""
    records = []
    for name, run in report.runs.items():
        table = run.table.set_index("model")
        rec: dict[str, Any] = {"protocol": name, "n": int(table.loc["student-none", "n"])}
        for model in ("teacher", *STUDENTS):
            if model in table.index:
                r = table.loc[model]
                rec |= {model: r["mean"], f"{model}_low": r["ci_low"], f"{model}_high": r["ci_high"]}
        for loss in ("kd", "pkdot"):
            r = table.loc[f"student-{loss}"]
            rec |= {
                f"{loss}_gap": r["diff"],
                f"{loss}_gap_low": r["diff_ci_low"],
                f"{loss}_gap_high": r["diff_ci_high"],
                f"{loss}_gap_p": r["p_value"],
            }
        rec |= {"test_train_ratio": run.test_train_ratio, "flagged": report_flagged(run)}
        records.append(rec)
    return pd.DataFrame.from_records(records)


def _gap(run: RunResult, loss: str) -> pd.Series:
    return (_runs(run, f"student-{loss}") - _runs(run, "student-none")).dropna()


def inflation_table(report: ProtocolReport) -> pd.DataFrame:
    """Per protocol other than ``sound``: the inflation over ``sound`` of each model's accuracy and of the
    kd − none and pkdot − none gaps, as a paired difference over the (fold, seed) runs (columns ``<what>``,
    ``<what>_low``, ``<what>_high``, ``<what>_p`` for what in ``teacher``, the students, ``kd_gap``,
    ``pkdot_gap``). The interval is the corrected one with the larger of the two protocols' n_test/n_train.

    Under ``select-on-test`` and ``teacher-all`` a run's folds are the sound run's (same seed, same subjects),
    so the pairs share their test subjects; under ``clips`` they share only the training seed.
    """
    if "sound" not in report.runs:
        return pd.DataFrame()
    sound = report.runs["sound"]
    records = []
    for name, run in report.runs.items():
        if name == "sound":
            continue
        ratio = max(run.test_train_ratio, sound.test_train_ratio)
        rec: dict[str, Any] = {"protocol": name}
        series = {m: (_runs(run, m), _runs(sound, m)) for m in ("teacher", *STUDENTS)}
        series |= {f"{loss}_gap": (_gap(run, loss), _gap(sound, loss)) for loss in ("kd", "pkdot")}
        for what, (a, b) in series.items():
            d = _diff(a, b, ratio)
            rec |= {
                what: d["mean_diff"],
                f"{what}_low": d["ci_low"],
                f"{what}_high": d["ci_high"],
                f"{what}_p": d["p_value"],
            }
            rec["n"] = d["n"]
        records.append(rec)
    return pd.DataFrame.from_records(records)


def _ci(rec: pd.Series | dict[str, Any], key: str, digits: int = 3, signed: bool = False) -> str:
    return (
        f"{fmt_float(rec[key], digits, signed)} [{fmt_float(rec[f'{key}_low'], digits, signed)}, "
        f"{fmt_float(rec[f'{key}_high'], digits, signed)}]"
    )


def protocol_markdown(table: pd.DataFrame, protocols: dict[str, Protocol]) -> str:
    header = [
        "protocol",
        "switches",
        "teacher",
        "student-none",
        "student-kd",
        "student-pkdot",
        "Δ kd − none",
        "Δ pkdot − none",
        "n",
        "n_test/n_train",
        "report flagged",
    ]
    rows = []
    for _, r in table.iterrows():
        p = protocols[r["protocol"]]
        rows.append(
            [
                f"`{p.name}`",
                ", ".join(f"`{k}: {v}`" for k, v in p.switches) or "(none)",
                _ci(r, "teacher") if "teacher" in r and not pd.isna(r["teacher"]) else "—",
                *(_ci(r, m) for m in STUDENTS),
                f"{_ci(r, 'kd_gap', 4, True)}, p = {fmt_float(r['kd_gap_p'])}",
                f"{_ci(r, 'pkdot_gap', 4, True)}, p = {fmt_float(r['pkdot_gap_p'])}",
                int(r["n"]),
                fmt_float(r["test_train_ratio"]),
                "yes" if r["flagged"] else "no",
            ]
        )
    return markdown_table(header, rows)


def inflation_markdown(inflation: pd.DataFrame) -> str:
    header = [
        "protocol",
        "teacher",
        "student-none",
        "student-kd",
        "student-pkdot",
        "kd − none gap",
        "pkdot − none gap",
        "n",
    ]
    keys = ("teacher", *STUDENTS, "kd_gap", "pkdot_gap")
    rows = [
        [f"`{r['protocol']}`", *(_ci(r, k, 4, True) for k in keys), int(r["n"])]
        for _, r in inflation.iterrows()
    ]
    singles = inflation[inflation["protocol"].isin(SINGLE_SWITCHES)]
    if len(singles) == len(SINGLE_SWITCHES):
        rows.append(
            [
                "sum of the three single switches (point estimate)",
                *(fmt_float(float(singles[k].sum()), 4, True) for k in keys),
                "",
            ]
        )
    return markdown_table(header, rows)


def attribution_sentences(table: pd.DataFrame, inflation: pd.DataFrame, metric: str) -> list[str]:
    """Plain sentences: which leak inflates the accuracy of the student and the PKDOT − none gap most."""
    if inflation.empty:
        return []
    out = []
    for what, label in (("student-pkdot", f"PKDOT student's {metric}"), ("pkdot_gap", "PKDOT − none gap")):
        singles = inflation[inflation["protocol"].isin(SINGLE_SWITCHES)]
        if singles.empty:
            continue
        top = singles.loc[singles[what].abs().idxmax()]
        everything = inflation[inflation["protocol"] == "authors"]
        tail = ""
        if not everything.empty:
            e = everything.iloc[0]
            tail = f"; all three together: {_ci(e, what, 4, True)}"
        out.append(
            f"- Largest single leak for the {label}: `{top['protocol']}`, {_ci(top, what, 4, True)}{tail}."
        )
    return out


def report_markdown(report: ProtocolReport, machine: dict[str, Any], command: str) -> str:
    """The whole results file."""
    protocols = {p.name: p for p in PROTOCOLS}
    spec = TASKS[DATA_TASKS[report.data]]
    lines = [
        f"# Protocol benchmark ({report.data}): the authors' protocol beside a sound one",
        "",
        f"> **{BANNER}** Rows other than `sound` use the authors'-protocol switches: they measure how much of "
        "a published gain such a protocol can create; they are not results about PKDOT.",
        "",
        machine_markdown(machine),
        f"- Command: `{command}`",
        f"- Total wall time: {report.total_s / 60:.1f} min ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in report.wall_s.items())
        + ")",
    ]
    first = next(iter(report.runs.values()), None)
    if first is not None:
        cfg, t = first.cfg, first.cfg.train
        size = f"{first.samples} windows" + (
            f" of {cfg.synth.subjects} synthetic subjects x {cfg.synth.samples_per_class} per class"
            if spec.data == "synthetic"
            else " (feature table)"
        )
        lines += [
            f"- Data: {spec.description}; {size}; data seed fixed (0): every protocol reads the same data set "
            f"(`{cfg.data.root}`). Student view {', '.join(spec.student)}, privileged {', '.join(spec.privileged)}.",
            f"- Runs: {report.folds} folds x {report.seeds} seeds (each seed draws its own folds), students "
            f"{', '.join(LOSSES)} in the paper's cell (frozen teacher backbone, targets of the fitted teacher); "
            f"preset `{cfg.preset}`{', --quick sizes' if report.quick else ''}; epochs unimodal/teacher/T-Net/"
            f"student {t.epochs_unimodal}/{t.epochs_teacher}/{t.epochs_tnet}/{t.epochs_student}; PKDOT k = "
            f"{cfg.distill.pkdot.k}, weight {cfg.distill.weight('pkdot'):g}; kd weight "
            f"{cfg.distill.weight('kd'):g}.",
            f"- Intervals: {CORRECTION_NAME} (Nadeau and Bengio; variance factor 1/n + n_test/n_train, n = folds "
            "x seeds runs), from `pkdot.evaluate.aggregate` as in `quality.py`; Δ paired by (fold, seed). Under "
            "`clips` n_test/n_train counts samples (the folds' unit), under the others subjects' samples.",
        ]
    lines += ["", "## Protocols", ""]
    lines += [f"- `{p.name}`: {p.description}." for p in PROTOCOLS]
    if report.failures:
        lines += ["", "## Failures", "", "These protocols stopped with an error (the exit status is 1):", ""]
        lines += [f"- **{k}**: `{' '.join(v.split())[:600]}`" for k, v in report.failures.items()]
    table = protocol_table(report)
    metric = first.metric if first is not None else "accuracy"
    if not table.empty:
        lines += [
            "",
            f"## Test {metric} per protocol",
            "",
            f"Mean {metric} [corrected 95% CI] per model, and each distiller's gain over `student-none` paired by "
            "(fold, seed) [corrected 95% CI], p (corrected). *report flagged*: the run's own `report/report.md` "
            f'opens with "{BANNER}".',
            "",
            protocol_markdown(table, protocols),
        ]
    inflation = inflation_table(report)
    if not inflation.empty:
        lines += [
            "",
            "## Inflation over the sound protocol",
            "",
            f"Protocol − `sound`, per (fold, seed) run [corrected 95% CI]: of each model's {metric}, and of the "
            "gaps kd − none and pkdot − none (a gap's inflation is how much of a reported gain the protocol "
            "itself creates). `select-on-test` and `teacher-all` keep the sound run's folds, so their pairs share "
            "test subjects; `clips` and `authors` draw other folds, so their pairs share only the seed.",
            "",
            inflation_markdown(inflation),
            "",
            *attribution_sentences(table, inflation, metric),
        ]
    if report.runs:
        lines += ["", "## Stage times", ""]
        lines += [
            f"- `{name}`: {format_stage_seconds(run.stage_seconds)}" for name, run in report.runs.items()
        ]
    return "\n".join(lines) + "\n"


def report_json(report: ProtocolReport, machine: dict[str, Any], command: str) -> dict[str, Any]:
    """The results as JSON: settings, machine, tables and every run's per-(fold, seed) scores."""

    def records(df: pd.DataFrame) -> list[dict[str, Any]]:
        return json.loads(df.to_json(orient="records"))

    return {
        "data": report.data,
        "task": DATA_TASKS[report.data],
        "seeds": report.seeds,
        "folds": report.folds,
        "quick": report.quick,
        "command": command,
        "machine": machine,
        "wall_s": report.wall_s,
        "failures": report.failures,
        "protocols": {
            p.name: {"switches": dict(p.switches), "description": p.description} for p in PROTOCOLS
        },
        "table": records(protocol_table(report)),
        "inflation": records(inflation_table(report)),
        "per_fold": {
            name: records(run.per_fold[["model", "fold", "seed", run.metric]])
            for name, run in report.runs.items()
        },
        "run_dirs": {name: str(run.cfg.run_dir) for name, run in report.runs.items()},
        "banners": {name: protocol_banner(run.cfg)[:1] for name, run in report.runs.items()},
    }


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=sorted(DATA_TASKS), default="features", help="data set")
    parser.add_argument("--seeds", type=int, default=None, help="seeds (default 5; --quick 1)")
    parser.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="the seeds are FIRST_SEED .. FIRST_SEED + SEEDS - 1 (more seeds in another work dir, see --pool-with)",
    )
    parser.add_argument("--folds", type=int, default=None, help="folds evaluated (default 5; --quick 2)")
    parser.add_argument(
        "--subjects", type=int, default=None, help="synthetic video subjects (default 10; --quick 4)"
    )
    parser.add_argument(
        "--protocols",
        nargs="+",
        default=list(PROTOCOL_NAMES),
        choices=list(PROTOCOL_NAMES),
        help="protocols to run (default all five)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for every protocol (repeatable), e.g. to match the runs of --pool-with",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the smoke test)")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="only read the run directories an earlier call finished (no stage runs) and write the tables",
    )
    parser.add_argument("--work-dir", type=Path, default=None, help="run directories")
    parser.add_argument(
        "--pool-with",
        type=Path,
        nargs="+",
        default=[],
        metavar="WORK_DIR",
        help="with --report-only: work dirs of runs with other seeds (--first-seed), pooled with WORK_DIR's",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results file (default benchmarks/results/protocol.md for features, protocol-video.md for video; "
        "--quick: WORK_DIR/protocol.md); the JSON goes beside it",
    )
    args = parser.parse_args(argv)
    if args.pool_with and not args.report_only:
        parser.error("--pool-with reads finished runs: use it with --report-only")
    if args.quick:
        args.seeds, args.folds, args.subjects = args.seeds or 1, args.folds or 2, args.subjects or 4
    else:
        args.seeds, args.folds, args.subjects = args.seeds or 5, args.folds or 5, args.subjects or 10
    # clips folds are the authors' stratified 5-fold: more than 5 folds cannot be evaluated under it
    if args.folds > 5 and any(p in args.protocols for p in ("clips", "authors")):
        parser.error("--folds: the clips protocols have 5 folds (StratifiedKFold(5)); use --folds <= 5")
    args.work_dir = args.work_dir or Path(
        "runs/bench-protocol-quick" if args.quick else "runs/bench-protocol"
    )
    name = "protocol.md" if args.data == "features" else f"protocol-{args.data}.md"
    out = args.out or (args.work_dir / name if args.quick else RESULTS_DIR / name)
    return args, out


def main(argv: Sequence[str] | None = None) -> Path:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args, out = parse_args(argv)
    machine = machine_info()
    command = "python benchmarks/protocol.py " + shlex.join(list(argv if argv is not None else sys.argv[1:]))
    report = run_protocols(
        args.data,
        seeds=args.seeds,
        folds=args.folds,
        subjects=args.subjects,
        quick=args.quick,
        work_dir=args.work_dir,
        protocols=args.protocols,
        report_only=args.report_only,
        first_seed=args.first_seed,
        pool_with=args.pool_with,
        extra=[parse_override(o) for o in args.overrides],
    )
    text = report_markdown(report, machine, command.strip())
    print("\n" + text)
    write_result(out, text)
    write_result(
        out.with_suffix(".json"), json.dumps(report_json(report, machine, command.strip()), indent=1) + "\n"
    )
    print(f"[protocol] wrote {out} (total {report.total_s / 60:.1f} min)")
    if report.failures:
        raise SystemExit(f"[protocol] failed: {', '.join(report.failures)} (see {out})")
    return out


if __name__ == "__main__":
    main()
