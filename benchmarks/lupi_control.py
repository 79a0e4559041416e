"""A *positive control* for the quality benchmark: a table on which privileged information is known to help.

The physiologically modelled sets (:mod:`pkdot.data.synthetic`, :mod:`pkdot.data.synthetic_features`) show no
distillation gain, and ``benchmarks/lupi_power.py`` measures why: there the true gain is within +-0.005. A null
result only means something if the same benchmark *can* see an effect where one exists, so this module writes
the textbook case, "relevant features as privileged information" of Lopez-Paz, Bottou, Schoelkopf and Vapnik,
*Unifying distillation and privileged information* (ICLR 2016, section 4), with subjects so that the benchmark's
subject folds apply:

- every window has ``DIMS`` standard-normal features, the student's view ``observed``;
- its label is ``1[a . x_J > 0]`` for ``RELEVANT`` of those coordinates ``J`` (fixed ``a``, one per data seed);
- the privileged view ``relevant`` is ``x_J`` itself at ``coupling = 1``: the teacher is told which few
  directions of the student's view decide the label, and where each window lies along them.
- At ``coupling = 0`` (the negative control) ``relevant`` is an independent draw with the *same label*: the
  teacher still learns the task perfectly well, but its outputs say nothing about the student's window beyond
  its label.

The student has to find the ``RELEVANT`` directions among ``DIMS`` from few labelled windows (an
estimation-limited student, far below its ceiling of 1.0); a teacher that reads them directly hands over, in
its soft outputs, each window's margin along them. Lopez-Paz et al. show this is where generalised distillation
gains most; at coupling 0 it can only act as a label smoother. The sizes are theirs (``DIMS = 50``,
``RELEVANT = 3``); the table size is the benchmark's (``TaskSpec.table_size``). Nothing here was tuned on a test
score of the benchmark: its data seed (0) is not the pilot's.

This is not a model of pain or affect: it is a check of the *benchmark and the distillers*, reported beside the
physiological tables as their positive control.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: Dimensions of the student's view, and how many of them decide the label (Lopez-Paz et al. 2016, sec. 4).
DIMS = 50
RELEVANT = 3
STUDENT_VIEW = "observed"
PRIVILEGED_VIEW = "relevant"


def draw_relevant_table(
    *, subjects: int, per_subject: int, coupling: float, seed: int = 0
) -> dict[str, np.ndarray | list[str]]:
    """Columns ``sample_id``, ``subject_id`` (lists of str), ``label`` (N,) int, ``observed`` (N, DIMS) and
    ``relevant`` (N, RELEVANT) float32. ``coupling`` is 1 (the privileged view is the student's deciding
    coordinates) or 0 (an independent draw with the same label)."""
    if coupling not in (0.0, 1.0):
        raise ValueError(f"relevant-features control: coupling must be 0 or 1, got {coupling}")
    if subjects < 2 or per_subject < 1:
        raise ValueError(
            f"relevant-features control: need >= 2 subjects and >= 1 window each, got "
            f"{subjects} x {per_subject}"
        )
    direction = np.random.default_rng([seed, 1]).standard_normal(RELEVANT)
    rng = np.random.default_rng([seed, 2])
    n = subjects * per_subject
    observed = rng.standard_normal((n, DIMS))
    label = (observed[:, :RELEVANT] @ direction > 0).astype(np.int64)
    if coupling == 1.0:
        relevant = observed[:, :RELEVANT].copy()
    else:
        other = np.random.default_rng([seed, 3])
        relevant = np.empty((n, RELEVANT))
        for i in range(n):  # rejection: a fresh point on the same side of the boundary
            while True:
                draw = other.standard_normal(RELEVANT)
                if int(draw @ direction > 0) == label[i]:
                    relevant[i] = draw
                    break
    subject_ids = [f"subject-{i // per_subject:03d}" for i in range(n)]
    sample_ids = [f"subject-{i // per_subject:03d}-w{i % per_subject:03d}" for i in range(n)]
    return {
        "sample_id": sample_ids,
        "subject_id": subject_ids,
        "label": label,
        STUDENT_VIEW: observed.astype(np.float32),
        PRIVILEGED_VIEW: relevant.astype(np.float32),
    }


def write_relevant_table(
    path: Path, *, subjects: int, per_subject: int, coupling: float, seed: int = 0
) -> Path:
    """Write the table in :mod:`pkdot.data.tabular`'s layout (temp file, then rename). Returns ``path``."""
    from pkdot.data.tabular import write_view_table

    cols = draw_relevant_table(subjects=subjects, per_subject=per_subject, coupling=coupling, seed=seed)
    views = {view: cols[view] for view in (STUDENT_VIEW, PRIVILEGED_VIEW)}
    return write_view_table(path, cols["sample_id"], cols["subject_id"], cols["label"], views)
