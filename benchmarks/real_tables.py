"""A real public multi-view data set for the quality benchmark, written as a pkdot feature table.

**Breast Cancer Wisconsin (Diagnostic)** (WDBC; W. N. Street, W. H. Wolberg, O. L. Mangasarian, 1993), as
shipped inside scikit-learn (``sklearn.datasets.load_breast_cancer``: no download). Licence: CC BY 4.0 (UCI
Machine Learning Repository, doi:10.24432/C5DW2B). 569 fine-needle-aspirate images of breast masses, one per
patient; label malignant (212) / benign (357).

Each image is described by ten nucleus measurements (radius, texture, perimeter, area, smoothness, compactness,
concavity, concave points, symmetry, fractal dimension) summarised over the nuclei of the image in three ways,
which we use as three *views* of the same sample:

- ``mean`` (student modality): the average nucleus — what a quick screening measurement gives;
- ``worst`` (privileged): the mean of the three largest values — needs every nucleus segmented;
- ``error`` (privileged): the standard error over nuclei — likewise.

The privileged views are predictable from the student's view (they summarise the same nuclei), which is the
condition under which privileged information can help (``../shared/paper-notes.md``). The views were fixed
before any result was seen and are not tuned. Each patient is its own subject, so subject folds are patient
folds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

#: View name -> the prefix/suffix that selects its ten columns in scikit-learn's feature names.
WDBC_VIEWS = {"mean": "mean ", "error": " error", "worst": "worst "}
WDBC_STUDENT = ("mean",)
WDBC_PRIVILEGED = ("worst", "error")


def wdbc_views() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The three ten-feature views ``{name: (569, 10) float32}`` and the labels (1 = malignant)."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    names = [str(n) for n in data.feature_names]
    views: dict[str, np.ndarray] = {}
    for view, key in WDBC_VIEWS.items():
        cols = [
            i for i, n in enumerate(names) if (n.startswith(key) if key.endswith(" ") else n.endswith(key))
        ]
        if len(cols) != 10:
            raise RuntimeError(f"WDBC view {view!r}: expected 10 columns, found {len(cols)} ({names})")
        views[view] = data.data[:, cols].astype(np.float32)
    labels = (data.target == 0).astype(np.int64)  # scikit-learn: 0 = malignant
    return views, labels


def write_wdbc_table(path: Path) -> Path:
    """Write WDBC as a pkdot table (``sample_id``, ``subject_id``, ``label``, one list column per view)."""
    views, labels = wdbc_views()
    n = len(labels)
    ids = [f"wdbc-{i:03d}" for i in range(n)]
    columns: dict[str, pa.Array] = {
        "sample_id": pa.array(ids),
        "subject_id": pa.array([f"patient-{i:03d}" for i in range(n)]),
        "label": pa.array(labels),
    }
    for view, values in views.items():
        columns[view] = pa.array([row.tolist() for row in values], type=pa.list_(pa.float32()))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(pa.table(columns), tmp)
    tmp.replace(path)
    return path
