"""How large is the privileged-information effect that the quality benchmark is trying to detect?

A power check for ``benchmarks/quality.py``: on the synthetic Biovid feature table
(:mod:`pkdot.data.synthetic_features`) it measures the *true* gain of teacher soft labels for a linear student,
i.e. on a large held-out set of new subjects instead of the benchmark's few test subjects, at coupling 1 (face and
physio read one shared response) and at coupling 0 (the negative control). If the true gain is far below the
half-width of the benchmark's corrected confidence interval, a null result of the benchmark says "too small to
see at this size", not "no effect".

The learners are deliberately simple and fixed before any number was seen (nothing here is tuned); they are
:mod:`pkdot.evaluate.diagnose`'s (``fit_probe``, ``crossfit_outputs``, ``fit_soft_student``), the gain that
``pkdot diagnose`` measures:

- student: scikit-learn's L2 logistic regression (``C = 1``) on the standardised student view;
- teacher: the same model on the standardised student and privileged views together, **cross-fitted** over
  3 subject groups (each training window's target comes from a teacher that never saw it: the
  ``distill.teacher_targets = crossfit`` idea), its logit divided by a temperature ``T``;
- ``kd`` student: logistic regression on the soft target ``alpha * label + (1 - alpha) * sigmoid(logit / T)``
  (each window entered once per class, weighted by the target's probability of that class).

Data seeds are disjoint from the benchmark's (training sets ``1000 + rep``, test sets ``5000 + rep``; the
benchmark's table is seed 0), so this check cannot leak the benchmark's test subjects into any choice.

Run: ``python benchmarks/lupi_power.py`` (about a minute on 2 cores); writes ``benchmarks/results/lupi-power.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS_DIR, machine_info, write_result  # noqa: E402

#: Training sizes (subjects, windows per class) checked: the landmarks task's (30 x 10, of which about 19
#: subjects train in a 5-fold split with validation), a smaller and a Part-A-sized study.
DEFAULT_SIZES = ((8, 10), (19, 10), (70, 20))
DEFAULT_VIEWS = ("face_landmarks", "face_au")
#: Subjects (x 20 windows per class) of the *ceiling* student: what the same face-only model reaches with far
#: more data, i.e. the head-room any distiller could at most recover at a given training size.
CEILING_SUBJECTS = 400


@dataclass(frozen=True)
class Gain:
    view: str
    subjects: int
    per_class: int
    coupling: float
    none: np.ndarray  # (reps,) held-out accuracy of the student trained on labels
    kd: np.ndarray  # (reps,) held-out accuracy of the student trained on the soft targets
    teacher: np.ndarray  # (reps,) accuracy of the cross-fitted teacher on the training windows
    ceiling: (
        np.ndarray
    )  # (reps,) held-out accuracy of the label-trained student given CEILING_SUBJECTS subjects

    @property
    def diff(self) -> np.ndarray:
        return self.kd - self.none


def held_out_gain(
    view: str,
    subjects: int,
    per_class: int,
    coupling: float,
    rep: int,
    *,
    test_subjects: int = 100,
    temperature: float = 4.0,
    alpha: float = 0.5,
    groups: int = 3,
    ceiling_subjects: int = CEILING_SUBJECTS,
) -> tuple[float, float, float, float]:
    """(none, kd, teacher, ceiling) accuracies of one repetition (see the module doc; the learners are
    :mod:`pkdot.evaluate.diagnose`'s)."""
    from pkdot.data.synthetic_features import draw_feature_table
    from pkdot.evaluate.diagnose import crossfit_outputs, fit_probe, fit_soft_student

    train = draw_feature_table(
        subjects=subjects, per_class=per_class, coupling=coupling, seed=1000 + rep, task="binary"
    )
    test = draw_feature_table(
        subjects=test_subjects, per_class=10, coupling=coupling, seed=5000 + rep, task="binary"
    )
    x, y = np.asarray(train[view], dtype=float), np.asarray(train["label"])
    both = np.c_[x, np.asarray(train["physio"], dtype=float)]
    subject = np.asarray(train["subject_id"])
    names = np.unique(subject)
    group_of = dict(zip(names, np.random.default_rng(rep).permutation(len(names)) % groups, strict=True))
    teacher_out = crossfit_outputs(both, y, np.array([group_of[s] for s in subject]))
    xt, yt = np.asarray(test[view], dtype=float), np.asarray(test["label"])
    none = float((fit_probe(x, y).predict(xt) == yt).mean())
    kd_model = fit_soft_student(x, y, teacher_out, temperature=temperature, alpha=alpha)
    kd = float((kd_model.predict(xt) == yt).mean())
    big = draw_feature_table(
        subjects=ceiling_subjects, per_class=20, coupling=coupling, seed=9000 + rep, task="binary"
    )
    ceiling_model = fit_probe(np.asarray(big[view], dtype=float), np.asarray(big["label"]))
    ceiling = float((ceiling_model.predict(xt) == yt).mean())
    return none, kd, float((teacher_out.argmax(1) == y).mean()), ceiling


def measure(views: Sequence[str], sizes: Sequence[tuple[int, int]], reps: int, **kwargs: float) -> list[Gain]:
    out = []
    for view in views:
        for subjects, per_class in sizes:
            for coupling in (1.0, 0.0):
                runs = np.array(
                    [
                        held_out_gain(view, subjects, per_class, coupling, rep, **kwargs)  # type: ignore[arg-type]
                        for rep in range(reps)
                    ]
                )
                out.append(
                    Gain(view, subjects, per_class, coupling, runs[:, 0], runs[:, 1], runs[:, 2], runs[:, 3])
                )
                print(
                    f"[lupi-power] {view} {subjects}x{per_class} coupling {coupling:g}: "
                    f"gain {out[-1].diff.mean():+.4f}",
                    flush=True,
                )
    return out


def markdown(gains: Sequence[Gain], reps: int, test_subjects: int, temperature: float, alpha: float) -> str:
    lines = [
        "| student view | training size (subjects x windows per class) | coupling | teacher (cross-fitted, "
        "on training windows) | student-none | student-kd | true gain kd − none: mean (sd over reps) | "
        "ceiling (same student, 400 subjects) | head-room ceiling − none |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for g in gains:
        lines.append(
            f"| `{g.view}` | {g.subjects} x {g.per_class} | {g.coupling:g} | {g.teacher.mean():.3f} | "
            f"{g.none.mean():.3f} | {g.kd.mean():.3f} | {g.diff.mean():+.4f} ({g.diff.std(ddof=1):.4f}) | "
            f"{g.ceiling.mean():.3f} | {(g.ceiling - g.none).mean():+.4f} |"
        )
    return (
        f"Held-out accuracy on {test_subjects} new subjects x 20 windows per repetition, {reps} repetitions "
        f"(own data seeds: training 1000 + rep, test 5000 + rep, ceiling 9000 + rep); T = {temperature:g}, alpha = {alpha:g}.\n\n"
        + "\n".join(lines)
    )


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--test-subjects", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--views", nargs="+", default=list(DEFAULT_VIEWS))
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "lupi-power.md")
    args = parser.parse_args(argv)
    if args.reps < 2:
        parser.error("--reps must be >= 2 (the table reports a standard deviation over repetitions)")
    start = time.perf_counter()
    gains = measure(
        args.views,
        DEFAULT_SIZES,
        args.reps,
        test_subjects=args.test_subjects,
        temperature=args.temperature,
        alpha=args.alpha,
    )
    info = machine_info()
    text = (
        "# LUPI power check: the true soft-label gain on the synthetic Biovid feature table\n\n"
        f"- Date: {info['date']}; command: `python benchmarks/lupi_power.py "
        f"{' '.join(argv if argv is not None else sys.argv[1:])}`; wall time "
        f"{time.perf_counter() - start:.0f} s\n\n"
        + markdown(gains, args.reps, args.test_subjects, args.temperature, args.alpha)
        + "\n"
    )
    print(text)
    return write_result(args.out, text)


if __name__ == "__main__":
    main()
