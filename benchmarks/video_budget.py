"""How many epochs does the video-only model need to learn from the face? Validation curves, not test scores.

The quality benchmark's synthetic Aff-Wild2 rows showed every video model at CCC about 0, at 10 subjects x 24 s
and again at 15 subjects x 48 s, while a ridge regression on the same 48-px face crops (lower half of the mean
frame, subject-held-out) reaches CCC about 0.45: the face carries valence, the network does not pick it up.
This check measures why: it trains the pipeline's own ``unimodal-video`` model (``pkdot train-teacher``, the
``demo`` preset's sizes) for many epochs and reads its per-epoch *validation* CCC (validation subjects carved from
each fold's training subjects) from every job's ``history.json``.

No test score is read, and the data are a synthetic set with a data seed disjoint from the benchmark's (the
benchmark's synthetic sets use seed 0; this check uses ``--data-seed``, 7 by default), so the budget it
suggests cannot leak the benchmark's test subjects into the benchmark's settings.

Run: ``python benchmarks/video_budget.py`` (about 5 minutes on 2 cores); writes
``benchmarks/results/video-budget.md`` and ``video-budget.png`` beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS_DIR, machine_info, machine_markdown, markdown_table, write_result  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
#: The demo preset's ``train.epochs_unimodal`` and ``train.epochs_student`` (the budget the benchmark used).
DEMO_EPOCHS = 8
PHASE = "unimodal-video"


def read_curves(run_dir: Path, phase: str = PHASE) -> pd.DataFrame:
    """Per-epoch validation metric of ``phase`` in every job of a run: columns job, epoch, val.

    Raises
    ------
    FileNotFoundError
        No ``teacher/**/history.json`` in ``run_dir``.
    KeyError
        A history has no ``phase`` (names the file).
    """
    rows = []
    files = sorted((Path(run_dir) / "teacher").rglob("history.json"))
    if not files:
        raise FileNotFoundError(f"{run_dir}/teacher: no history.json (run `pkdot train-teacher` first)")
    for path in files:
        phases = json.loads(path.read_text()).get("phases", {})
        if phase not in phases:
            raise KeyError(f"{path}: no phase {phase!r} (phases: {sorted(phases)})")
        job = str(path.parent.relative_to(Path(run_dir) / "teacher"))
        for entry in phases[phase]["epochs"]:
            rows.append({"job": job, "epoch": int(entry["epoch"]), "val": float(entry["val_metric"])})
    return pd.DataFrame(rows)


def summarise(curves: pd.DataFrame, budgets: Sequence[int]) -> pd.DataFrame:
    """For each budget E: the validation score the pipeline would keep (each job's best epoch <= E), mean and
    sd over jobs, and the mean selected epoch. Budgets beyond the longest curve are left out."""
    longest = int(curves["epoch"].max())
    rows = []
    for budget in budgets:
        if budget > longest:
            continue
        kept = curves[curves["epoch"] <= budget]
        best = kept.loc[kept.groupby("job")["val"].idxmax()]
        rows.append(
            {
                "budget": int(budget),
                "val_mean": float(best["val"].mean()),
                "val_sd": float(best["val"].std(ddof=1)) if len(best) > 1 else float("nan"),
                "best_epoch_mean": float(best["epoch"].mean()),
                "jobs": int(len(best)),
            }
        )
    return pd.DataFrame(rows)


def ridge_reference(run_dir: Path, folds: int, task: str) -> float:
    """Subject-held-out CCC of a ridge regression on the face crops the video model reads (the lower half of each
    clip's mean grey frame, standardised, 50 principal components, ``RidgeCV``): how much of the label a linear
    read-out of the pixels finds, i.e. whether the crops carry the signal at all. scikit-learn ``GroupKFold``
    over subjects; the CCC is computed once over all held-out predictions."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from pkdot.metrics import ccc

    faces = pd.read_parquet(Path(run_dir) / "features" / "faces.parquet")
    manifest = pd.read_parquet(Path(run_dir) / "manifest.parquet")
    data = faces.merge(manifest[["sample_id", "subject_id", task]], on="sample_id", validate="one_to_one")
    grey = np.stack(
        [
            np.frombuffer(buf, np.uint8).reshape(shape).astype(np.float32).mean(axis=(0, 3))
            for buf, shape in zip(data["frames"], data["frames_shape"], strict=True)
        ]
    )
    x = grey[:, grey.shape[1] // 2 :, :].reshape(len(grey), -1)
    y = data[task].to_numpy(np.float64)
    pred = np.zeros_like(y)
    for train, test in GroupKFold(folds).split(x, y, data["subject_id"]):
        model = make_pipeline(
            StandardScaler(),
            PCA(min(50, len(train) - 1), svd_solver="full"),
            RidgeCV(alphas=np.logspace(-1, 4, 12)),
        )
        pred[test] = model.fit(x[train], y[train]).predict(x[test])
    return float(ccc(y, pred))


def plot(curves: pd.DataFrame, path: Path, title: str, ridge: float | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for _job, df in curves.groupby("job"):
        ax.plot(df["epoch"], df["val"], color="0.7", lw=0.8)
    mean = curves.groupby("epoch")["val"].mean()
    ax.plot(mean.index, mean.values, color="C0", lw=2, label="mean over folds")
    ax.axvline(DEMO_EPOCHS, color="C3", ls="--", label=f"demo preset budget ({DEMO_EPOCHS} epochs)")
    ax.axhline(0.0, color="k", lw=0.5)
    if ridge is not None:
        ax.axhline(ridge, color="C2", ls=":", label=f"ridge on the crops, subjects held out ({ridge:+.2f})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation CCC (validation subjects)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pkdot(*args: str) -> None:
    cmd = [str(Path(sys.executable).parent / "pkdot"), *args]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed:\n{(done.stdout + done.stderr)[-4000:]}")


def stage_seconds(run_dir: Path) -> dict[str, float]:
    """Seconds of each stage when it last ran, from the run's stage markers (``stages/<stage>.json``)."""
    return {
        p.stem: float(json.loads(p.read_text())["seconds"])
        for p in sorted((Path(run_dir) / "stages").glob("*.json"))
    }


def run(args: argparse.Namespace) -> tuple[pd.DataFrame, float]:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    start = time.perf_counter()
    data, run_dir = args.work_dir / "data", args.work_dir / "run"
    if not data.is_dir():
        _pkdot(
            "synth", "affwild2", "--out", str(data), "--subjects", str(args.subjects),
            "--seconds-per-video", f"{args.seconds_per_video:g}", "--seed", str(args.data_seed),
        )  # fmt: skip
    sets = {
        "train.folds": args.folds,
        "train.max_folds": args.folds,
        "train.seeds": list(range(args.seeds)),
        "train.epochs_unimodal": args.epochs,
        # only the video-only model's curve is read: the teacher and T-Net get one epoch
        "train.epochs_teacher": 1,
        "train.epochs_tnet": 1,
        "train.num_workers": 1,
    }
    flags = [a for k, v in sets.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    _pkdot(
        "extract", "--preset", "demo", "--dataset", "affwild2", "--task", args.task,
        "--root", str(data), "--out", str(run_dir), *flags,
    )  # fmt: skip
    _pkdot("train-teacher", "--run", str(run_dir), *flags)
    return read_curves(run_dir), time.perf_counter() - start


def report(args: argparse.Namespace, curves: pd.DataFrame, wall_s: float, command: str) -> str:
    budgets = sorted({DEMO_EPOCHS, 16, 24, 32, 48, 64, args.epochs})
    table = summarise(curves, budgets)
    mean = curves.groupby("epoch")["val"].mean()
    rows = [
        (
            r.budget,
            f"{r.val_mean:+.3f}",
            f"{r.val_sd:.3f}",
            f"{r.best_epoch_mean:.1f}",
            r.jobs,
        )
        for r in table.itertuples()
    ]
    png = args.out.with_suffix(".png")
    run_dir = args.work_dir / "run"
    ridge = ridge_reference(run_dir, args.folds, args.task)
    plot(
        curves,
        png,
        f"unimodal-video, synthetic Aff-Wild2 {args.task}, {args.subjects} subjects x "
        f"{args.seconds_per_video:g} s, data seed {args.data_seed}",
        ridge,
    )
    stages = stage_seconds(run_dir)
    stage_text = ", ".join(f"{k} {v:.0f} s" for k, v in stages.items())
    return "\n".join(
        [
            "# Video-only model: epochs needed to learn from the face (validation curves)",
            "",
            machine_markdown(machine_info()),
            f"- Command: `{command}`",
            f"- Wall time of this call: {wall_s / 60:.1f} min; the stages when they last ran: {stage_text} "
            "(a stage whose inputs did not change is not rerun)",
            f"- Data: synthetic Aff-Wild2, {args.subjects} subjects x {args.seconds_per_video:g} s, data seed "
            f"{args.data_seed} (the quality benchmark's sets use seed 0); task {args.task}; "
            f"{args.folds}-fold subject k-fold x {args.seeds} seed(s): {curves['job'].nunique()} jobs.",
            "- Model: the pipeline's `unimodal-video` (`pkdot train-teacher`, demo preset: small3d width 8, "
            "8 frames of 48x48, Adam lr 3e-3, batch 32). Only *validation* CCC is read (validation subjects "
            "carved from each fold's training subjects); no test score.",
            "",
            "Per budget E: each job keeps its best validation epoch <= E (what the pipeline does), mean and sd "
            "over jobs.",
            "",
            markdown_table(
                ("budget E (epochs)", "val CCC kept, mean", "sd", "selected epoch, mean", "jobs"), rows
            ),
            "",
            f"Reference: a ridge regression on the same crops (lower half of each clip's mean grey frame, 50 "
            f"principal components), {args.folds}-fold subject-held-out: CCC {ridge:+.3f}. The crops carry the "
            "signal; the question is only how long the network needs to find it.",
            "",
            f"Mean validation CCC per epoch peaks at epoch {int(mean.idxmax())} ({mean.max():+.3f}); at the demo "
            f"budget's last epoch ({DEMO_EPOCHS}) it is {mean.loc[DEMO_EPOCHS]:+.3f}.",
            "",
            f"![validation curves]({png.name})",
            "",
        ]
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", type=int, default=15)
    parser.add_argument("--seconds-per-video", type=float, default=48.0)
    parser.add_argument("--data-seed", type=int, default=7, help="synthetic data seed (benchmark's: 0)")
    parser.add_argument("--task", choices=("valence", "arousal"), default="valence")
    parser.add_argument("--epochs", type=int, default=64, help="longest budget trained")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bench-video-budget"))
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "video-budget.md")
    args = parser.parse_args(argv)
    if args.data_seed == 0:
        parser.error("--data-seed 0 is the quality benchmark's data: choose another seed")
    return args


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(argv)
    given = list(argv if argv is not None else sys.argv[1:])
    command = shlex.join(["python", "benchmarks/video_budget.py", *given])
    curves, wall_s = run(args)
    out = write_result(args.out, report(args, curves, wall_s, command))
    print(out.read_text())
    return out


if __name__ == "__main__":
    main()
