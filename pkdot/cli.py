"""The ``pkdot`` command: one subcommand per stage, plus ``run`` (the whole pipeline) and ``predict``; every
option's help ends with its default (:class:`HelpFormatter`)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from pkdot import __version__
from pkdot.errors import PkdotError

log = logging.getLogger("pkdot")

for _k, _v in {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MPLBACKEND": "Agg",
    # Ray Train V2 turns a worker's print() into a log record *and* (as a Ray worker's sys.stdout is not
    # sys.__stdout__) the print itself: every printed line reached the driver twice. One copy is enough.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    # Lines logged outside a Prefect flow run (the Ray workers' output, read by Ray's log thread) stay out of
    # Prefect's API log handler quietly instead of printing a UserWarning each time.
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    # `pkdot run` starts Prefect's temporary server in-process; its 20 s default start-up limit fails the whole
    # command on a busy machine (measured: a 2-core machine at load 50 needed more).
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}.items():
    os.environ.setdefault(_k, _v)


def _set_option(p: argparse.ArgumentParser, what: str) -> None:
    """``--set KEY=VALUE`` (repeatable): dotted config overrides."""
    text = f"{what}, e.g. --set train.epochs_student=3 (repeatable)"
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=text)


def _config_args(p: argparse.ArgumentParser) -> None:
    for flag, kw, text in (
        ("--config", {"type": Path}, "Run config YAML, every field optional (default: none: the preset's "
         "values)"),
        ("--preset", {"choices": ["demo", "paper"]}, "Preset applied before the file: demo = tiny models, "
         "minutes on a CPU; paper = the paper's sizes (default: the config file's preset, else demo)"),
        ("--set", {}, ""),
        ("--dataset", {"choices": ["biovid", "affwild2", "table"]}, "Data set kind; table = a Parquet file "
         "of per-sample feature vectors (default: the config's data.dataset, biovid)"),
        ("--root", {"type": Path}, "Dataset root, a Parquet file for --dataset table (default: a synthetic "
         "set generated in the run directory)"),
        ("--task", {"choices": ["binary", "multiclass", "valence", "arousal", "regression"]}, "binary (BL1 "
         "vs PA4) / multiclass (Biovid), valence / arousal (Aff-Wild2), regression (table with a float "
         "'target' column) (default: binary; valence for --dataset affwild2)"),
        ("--part", {"choices": ["A", "B"]}, "Biovid part; B adds facial EMG (default: the config's, A)"),
        ("--skip-bad", {"action": "store_true"}, "Skip and report bad samples instead of failing"),
        ("--student-modalities", {"metavar": "LIST"}, "Comma list (table data): the modality the student has "
         "at test time (default: video)"),
        ("--privileged-modalities", {"metavar": "LIST"}, "Comma list (table data): teacher-only modalities "
         "(default: physio for Biovid, audio for Aff-Wild2)"),
        ("--seed", {"type": int}, "Seed of the synthetic data and of the fold assignment (default: the "
         "config's seed, 0)"),
    ):  # fmt: skip
        if flag == "--set":
            _set_option(p, "Override a config field")
        else:
            p.add_argument(flag, **kw, help=text)


def _build_config(args: argparse.Namespace, run_dir: Path | None = None):
    """The config from ``--config``/``--preset`` and the CLI's options, or, with ``--run`` (the stages after
    extract), that run directory's config.yaml with its ``--set`` overrides."""
    from pkdot.config import load_config, parse_override

    if (run := getattr(args, "run", None)) is not None and not (run / "config.yaml").is_file():
        raise PkdotError(f"{run / 'config.yaml'} does not exist: run `pkdot extract ... --out {run}` first")
    over: dict[str, Any] = {}
    if ds := getattr(args, "dataset", None):
        over["data.dataset"] = ds
        if ds == "affwild2":
            over |= {"data.privileged_modalities": ["audio"], "data.task": "valence"}
    for attr, key in (("root", "data.root"), ("task", "data.task"), ("part", "data.part"), ("seed", "seed")):
        if (v := getattr(args, attr, None)) is not None:
            over[key] = str(v) if isinstance(v, Path) else v
    if getattr(args, "skip_bad", False):
        over["data.skip_bad"] = True
    for attr in ("student_modalities", "privileged_modalities"):
        if v := getattr(args, attr, None):
            over[f"data.{attr}"] = [s.strip() for s in v.split(",") if s.strip()]
    if run_dir is not None:
        over["run_dir"] = str(run_dir)
    ray = {"ray_address": args.ray_address} if getattr(args, "ray_address", None) else {}
    over |= ray | dict(map(parse_override, args.overrides))
    if run is None:
        return load_config(args.config, preset=args.preset, overrides=over)
    # on a run directory --ray-address wins over --set ray_address=... (on a new run --set wins)
    return load_config(run / "config.yaml", overrides={"run_dir": str(run)} | over | ray)


# ---- commands -----------------------------------------------------------------------------------------------
def cmd_synth(args: argparse.Namespace) -> int:
    from pkdot.data.synthetic import write_synthetic

    options = (
        "subjects seed samples_per_class part videos_per_subject seconds_per_video frame_size fps coupling"
    )
    out = write_synthetic(args.kind, args.out, **{k: getattr(args, k) for k in options.split()})
    print(f"wrote a synthetic {args.kind} set to {out}")
    return 0


def cmd_manifest(args: argparse.Namespace) -> int:
    from pkdot.data import build_manifest, write_manifest_report
    from pkdot.data.manifest import write_manifest

    cfg = _build_config(args)
    result = build_manifest(cfg.data, cfg.data.root)
    write_manifest(result.frame, args.out)
    report = args.out.with_name(args.out.stem + "_report.json")
    write_manifest_report(result, report)
    skipped = f", {len(result.skipped)} skipped (see {report})" if result.skipped else ""
    print(
        f"wrote {args.out}: {len(result.frame)} samples, {result.frame['subject_id'].nunique()} subjects{skipped}"
    )
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    """One stage on a run directory (extract: makes the run directory and its manifest first)."""
    from pkdot.pipeline import prepare_run, run_dir_lock, run_stage

    if args.command == "extract" and args.workers:
        args.overrides = [*args.overrides, f"features.workers={args.workers}"]
    cfg = _build_config(args, run_dir=getattr(args, "out", None))
    with run_dir_lock(cfg.run_dir, wait=args.wait_lock):
        if args.command == "extract":
            cfg = prepare_run(cfg)
            run_stage("manifest", cfg)
        options: dict[str, Any] = {}  # the stage's own: --loss of distill, --robustness of evaluate
        if getattr(args, "loss", None):
            options["losses"] = [s.strip() for item in args.loss for s in item.split(",") if s.strip()]
        if getattr(args, "robustness", None) is not None:
            options["robustness"] = args.robustness
        res = run_stage(args.command, cfg, **options)
    print(f"{args.command}: {res.path} ({'up to date' if res.skipped else 'done'})")
    if args.command == "evaluate":
        print(res.details.get("summary_markdown", ""))
        _print_where(res.details)
    else:
        for k, v in sorted(res.details.items()):
            print(f"  {k}: {v}")
    return 0


def _print_where(details: dict[str, Any]) -> None:
    print(f"report: {details.get('report')}")
    if uri := details.get("tracking_uri"):
        sqlite = uri.startswith("sqlite")
        print(f"MLflow UI: mlflow ui --backend-store-uri {uri}" if sqlite else f"MLflow: {uri}")
    if details.get("model_name"):
        print(
            f"registered model: models:/{details['model_name']}/{details['model_version']} "
            f"(alias {details['alias']}: models:/{details['model_name']}@{details['alias']})"
        )


def cmd_run(args: argparse.Namespace) -> int:
    from pkdot.pipeline import run_all, run_dir_lock

    cfg = _build_config(args, run_dir=args.run_dir)
    with run_dir_lock(cfg.run_dir, wait=args.wait_lock):
        if args.no_prefect:
            results = run_all(cfg)
            details = results["evaluate"].details | results["refit"].details
        else:
            from flows.pipeline import pipeline
            from pkdot.rundir import atomic_write_text

            cfg_path = Path(cfg.run_dir) / "requested-config.yaml"
            atomic_write_text(cfg_path, cfg.yaml_text())
            details = pipeline(config_path=str(cfg_path))["evaluate"]
    _print_where(details)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from pkdot.predict import describe_model, predict_videos

    if args.describe:
        print(describe_model(args.model, tracking_uri=args.tracking_uri))
    elif not args.videos:
        raise PkdotError("pkdot predict: name at least one video (or pass --describe alone)")
    for row in predict_videos(args.model, args.videos, tracking_uri=args.tracking_uri) if args.videos else []:
        print(json.dumps(row))
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    from pkdot.evaluate.diagnose import diagnose, run_views, table_views, write_outputs
    from pkdot.rundir import RunDir

    pick = lambda names: [m for n in names or () for m in n.split(",") if m]  # noqa: E731
    student, privileged = pick(args.student_modalities), pick(args.privileged_modalities)
    if args.table is not None:
        views = table_views(args.table, student, privileged)
        out = args.out or args.table.with_name(f"{args.table.stem}-diagnose")
    else:
        views = run_views(args.run, student, privileged)
        out = args.out or RunDir(args.run).diagnose
    result = diagnose(views, folds=args.folds, repeats=args.repeats)
    files = write_outputs(result, out)
    print(result.text())
    print("wrote " + ", ".join(str(f) for f in files))
    if args.run is not None:
        from pkdot.config import load_config
        from pkdot.tracking.runs import Tracker

        cfg = load_config(RunDir(args.run).config)
        if cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"):
            with Tracker(cfg).stage_run("diagnose", verdict=result.verdict) as stage_run:
                stage_run.log_metrics({f"{k}_{s}": v[s] for k, v in result.summary().items() for s in v})
                for path in files:
                    stage_run.log_artifact(path, "diagnose")
    return 0


DESCRIPTION = """\
pkdot: privileged multimodal knowledge distillation with optimal transport (PKDOT).

A video-only student learns from a teacher that also saw a privileged modality (physiology, audio) during
training. One subcommand per pipeline stage (extract, train-teacher, cache, distill, evaluate) working on a
run directory, 'run' for the whole pipeline (a Prefect flow; a synthetic Biovid demo with no arguments), and
'predict' for a registered student. Every option below shows its default.
"""

EXAMPLES = """\
examples:
  pkdot run                                   synthetic Biovid demo (what 'make demo' runs)
  pkdot run --dataset biovid --root /data/biovid/PartA --task binary
  pkdot run --dataset affwild2 --root /data/affwild2 --task valence --preset paper
  pkdot run --dataset table --root feats.parquet --student-modalities face --privileged-modalities eeg,gsr
  pkdot run --set train.folds=loso --set train.epochs_student=30 --run-dir runs/loso
  pkdot extract --dataset biovid --root /data/biovid/PartA --out runs/r1
  pkdot train-teacher --run runs/r1 --ray-address auto
  pkdot distill --run runs/r1 --loss pkdot --loss none
  pkdot evaluate --run runs/r1 --robustness
  pkdot predict --model models:/pkdot-student-biovid@champion \\
      --tracking-uri sqlite:///runs/biovid-demo/mlflow.db clip1.mp4 clip2.mp4
  pkdot -v run                                per-epoch lines and INFO logs on the console too

The console shows one progress display per stage; the full log (per-epoch lines included) is in
RUN/logs/pkdot.log, the per-epoch metrics also in MLflow.
"""


#: Each subcommand's examples (its --help epilogue).
SUBCOMMAND_EXAMPLES = {
    "synth": "  pkdot synth biovid --out /tmp/b --subjects 4 --seed 0\n",
    "manifest": "  pkdot manifest --dataset biovid --root /tmp/b --out /tmp/m.parquet\n",
    "extract": "  pkdot extract --dataset biovid --root /data/biovid/PartA --out runs/r1 --workers 4\n",
    "train-teacher": "  pkdot train-teacher --run runs/r1 --set train.epochs_teacher=30\n",
    "cache": "  pkdot cache --run runs/r1\n",
    "distill": "  pkdot distill --run runs/r1 --loss pkdot --loss none,kd\n",
    "evaluate": "  pkdot evaluate --run runs/r1 --robustness\n",
    "refit": "  pkdot refit --run runs/r1\n  pkdot refit --run runs/r1 --set train.refit=false   # skip it\n",
    "run": "  pkdot run\n"
    "  pkdot run --dataset biovid --root /data/biovid/PartA --task multiclass --preset paper\n",
    "predict": "  pkdot predict --model models:/pkdot-student-biovid@champion \\\n"
    "      --tracking-uri sqlite:///runs/biovid-demo/mlflow.db clip1.mp4\n",
    "diagnose": "  pkdot diagnose --table feats.parquet --student-modalities face "
    "--privileged-modalities eeg,gsr\n  pkdot diagnose --run runs/r1\n",
}


def _lock_arg(p: argparse.ArgumentParser) -> None:
    text = "When another pkdot command writes to the run directory, wait for it instead of failing"
    p.add_argument("--wait-lock", action="store_true", help=text)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Keeps the description/epilogue as written and adds ``(default: ...)`` to every option's help; ``None``
    defaults ("take it from the config") are described in the help text itself."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or action.default in (argparse.SUPPRESS, None) or action.required:
            return text
        if not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text
        if action.default is False and action.nargs == 0:
            return f"{text} (default: off)"
        if action.default == []:
            return f"{text} (default: none)"
        return f"{text} (default: %(default)s)"


def _add_parser(sub: Any, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand whose help lists every option with its default (and ``-v`` also after the command)."""
    epilog = "examples:\n" + SUBCOMMAND_EXAMPLES[name]
    p = sub.add_parser(name, help=help, description=help, epilog=epilog, formatter_class=HelpFormatter)
    text = "Also show INFO logs and the per-epoch lines on the console (same as 'pkdot -v') (default: off)"
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=text)
    return p


def _version() -> str:
    try:
        return version("pkdot")
    except PackageNotFoundError:  # a source checkout that was never installed
        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pkdot", description=DESCRIPTION, epilog=EXAMPLES, formatter_class=HelpFormatter
    )
    text = "Also show INFO logs and the per-epoch training lines on the console (they are always in "
    parser.add_argument("-v", "--verbose", action="store_true", help=text + "RUN/logs/pkdot.log)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _add_parser(sub, "synth", "Write a synthetic data set in the real Biovid / Aff-Wild2 layout")
    p.add_argument("kind", choices=["biovid", "affwild2"], help="Which data set's layout to write")
    p.add_argument("--out", type=Path, required=True, help="Folder to write the data set to (required)")
    for flag, default, text in (  # the option's type is its default's
        ("--subjects", 8, "Number of synthetic subjects"),
        ("--seed", 0, "Random seed (same seed = byte-identical files)"),
        ("--samples-per-class", 4, "Biovid: samples per subject and pain level"),
        ("--part", "A", "Biovid part (B adds facial EMG)"),
        ("--videos-per-subject", 1, "Aff-Wild2: videos per subject"),
        ("--seconds-per-video", 12.0, "Aff-Wild2: length of each video"),
        ("--frame-size", 160, "Frame side in pixels (>= 96 for reliable detection)"),
        ("--fps", 25, "Frames per second of the videos"),
        ("--coupling", 1.0, "In [0, 1]: how much the privileged modality (physio / audio) and the face "
         "share one latent response; 1 = shared, 0 = independent given the label (negative control)"),
    ):  # fmt: skip
        choices = ["A", "B"] if flag == "--part" else None
        p.add_argument(flag, type=type(default), default=default, choices=choices, help=text)
    p.set_defaults(fn=cmd_synth)

    manifest = "Dataset root -> manifest Parquet (one row per sample; bad samples named)"
    p = _add_parser(sub, "manifest", manifest)
    _config_args(p)
    p.add_argument("--out", type=Path, required=True, help="Manifest Parquet file to write (required)")
    p.set_defaults(fn=cmd_manifest)

    from pkdot.pipeline import STAGES

    for number, stage in enumerate(STAGES[1:], start=1):  # the manifest is part of extract
        p = _add_parser(sub, stage.name, f"Stage {number}: {stage.help}")
        if stage.name == "extract":
            _config_args(p)
            p.add_argument("--out", type=Path, required=True, help="Run directory (required)")
            text = "Parallel extraction tasks (default: the config's features.workers, 2 in both presets)"
            p.add_argument("--workers", type=int, help=text)
        else:
            text = "Run directory (from 'pkdot extract --out') (required)"
            p.add_argument("--run", type=Path, required=True, help=text)
            _set_option(p, "Override a field of the run's config.yaml")
        text = "Ray cluster: 'auto' or host:port (default: the run's ray_address, else $RAY_ADDRESS, else a "
        p.add_argument("--ray-address", help=text + "private local Ray)")
        _lock_arg(p)
        if stage.name == "distill":
            text = "A registered loss (see distill.losses); repeatable or comma-separated (default: the "
            p.add_argument("--loss", action="append", help=text + "config's distill.losses)")
        if stage.name == "evaluate":
            text = "Evaluate the students and the unimodal video model on degraded test video (0-90%% of "
            text += "frames dropped, Gaussian noise, blur): report/robustness.png, robustness.csv, a report "
            text += "section and MLflow metrics (default: the config's evaluate.robustness, which is on "
            text += "whenever the student watches video)"
            p.add_argument("--robustness", action=argparse.BooleanOptionalAction, default=None, help=text)
        p.set_defaults(fn=cmd_stage)

    p = _add_parser(sub, "run", "The whole pipeline (synthetic Biovid demo with no arguments)")
    _config_args(p)
    p.add_argument("--run-dir", type=Path, help="Run directory (default: runs/<dataset>-<preset>)")
    text = "Ray cluster: 'auto' or host:port of a running cluster (default: $RAY_ADDRESS, else a private "
    p.add_argument("--ray-address", help=text + "local Ray)")
    p.add_argument("--no-prefect", action="store_true", help="Run the stages directly, without Prefect")
    _lock_arg(p)
    p.set_defaults(fn=cmd_run)

    p = _add_parser(sub, "predict", "Predict pain level / VA per video with a registered student")
    text = "Registered model URI, e.g. models:/pkdot-student-biovid@champion (required)"
    p.add_argument("--model", required=True, help=text)
    text = "MLflow store holding the registered model, e.g. sqlite:///runs/biovid-demo/mlflow.db or "
    text += "http://HOST:5000 (default: $MLFLOW_TRACKING_URI; required when that is unset)"
    p.add_argument("--tracking-uri", help=text)
    p.add_argument(
        "videos", nargs="*", type=Path, help="Video files (mp4, ...) to predict, one JSON line each"
    )
    text = "Print the model card's one-line summary (what the model predicts, from what, its cross-validated "
    p.add_argument("--describe", action="store_true", help=text + "estimate, what it was trained on) first")
    p.set_defaults(fn=cmd_predict)

    diagnose = (
        "Will the privileged modality help the student? Linear probes with subject folds, before training"
    )
    p = _add_parser(sub, "diagnose", diagnose)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--table", type=Path, help="A feature table, the layout of --dataset table (default: none; or --run)"
    )
    source.add_argument(
        "--run", type=Path, help="A run directory after 'pkdot extract' (default: none; or --table)"
    )
    for view, default in (("student", "the table's first list column"), ("privileged", "the other ones")):
        text = f"{view.capitalize()} columns/modalities, comma- or space-separated (default: {default}; "
        text += "for --run, the run's config)"
        p.add_argument(f"--{view}-modalities", nargs="+", metavar="NAME", help=text)
    p.add_argument("--folds", type=int, default=5, help="Subject folds per repeat")
    p.add_argument("--repeats", type=int, default=3, help="Repeats of the subject k-fold (different folds)")
    text = "Folder for diagnose.json/png (default: RUN/diagnose, FILE-diagnose)"
    p.add_argument("--out", type=Path, help=text)
    p.set_defaults(fn=cmd_diagnose)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run" and args.run_dir is None:
        args.run_dir = Path("runs") / f"{args.dataset or 'biovid'}-{args.preset or 'demo'}"
    from pkdot.console import console_session, route_ray_worker_logs
    from pkdot.ray_utils import add_init_hook

    add_init_hook(route_ray_worker_logs)  # within the session, Ray's worker output goes to the log
    # the log file goes to the run directory, unless a stage command names one that is not a run (that command
    # fails with a message; it must not leave a logs/ folder behind)
    log_dir = _run_dir_of(args)
    if log_dir and args.command not in ("run", "extract") and not (log_dir / "config.yaml").is_file():
        log_dir = None
    try:
        with console_session(verbose=args.verbose, run_dir=log_dir):
            code = int(args.fn(args) or 0)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the clean-up
        _end_parent_run(args, "KILLED")
        print(f"pkdot {args.command}: {INTERRUPTED}", file=sys.stderr)
        return 130
    except PkdotError as exc:
        _end_parent_run(args, "FAILED")
        print(f"pkdot {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BaseException:
        _end_parent_run(args, "FAILED")
        raise
    _end_parent_run(args, "FINISHED" if code == 0 else "FAILED")
    return code


#: What Ctrl-C prints (every stage writes atomically and resumes from what is complete).
INTERRUPTED = "interrupted; the run directory is consistent, re-run to resume"


def _run_dir_of(args: argparse.Namespace) -> Path | None:
    """The run directory a command works in (None for synth, manifest and predict)."""
    if args.command in ("synth", "manifest", "predict"):
        return None
    run_dir = getattr(args, "out", None) if args.command == "extract" else None
    return run_dir or getattr(args, "run", None) or getattr(args, "run_dir", None)


def _end_parent_run(args: argparse.Namespace, status: str) -> None:
    """End the run directory's MLflow parent run (if the command made one) so it never stays RUNNING."""
    if (run_dir := _run_dir_of(args)) is None or not (Path(run_dir) / "mlflow_parent.json").is_file():
        return
    try:
        from pkdot.tracking.runs import end_parent_run

        end_parent_run(run_dir, status)
    except Exception as exc:  # noqa: BLE001 - MLflow's own errors too: never hide the command's outcome
        log.warning("could not mark the MLflow parent run of %s %s: %s", run_dir, status, exc)


if __name__ == "__main__":
    sys.exit(main())
