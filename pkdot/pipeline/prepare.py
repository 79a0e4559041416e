"""Run preparation: the run directory, its ``config.yaml``, and the synthetic data set when no root is given."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from pkdot.config import RunConfig
from pkdot.data.manifest import BIOVID_CLASSES
from pkdot.data.synthetic import GENERATOR_VERSION, write_synthetic
from pkdot.data.tabular import infer_num_classes
from pkdot.errors import StageError
from pkdot.pipeline.base import remove_stale
from pkdot.rundir import RunDir, atomic_write_json, atomic_write_text

status = logging.getLogger("pkdot.status")


def prepare_run(cfg: RunConfig) -> RunConfig:
    """Make the run directory, write config.yaml, and generate the synthetic set when no root is given.
    Returns the config with an absolute ``run_dir`` and the data root (and a table's class count) filled in."""
    rd = RunDir(Path(cfg.run_dir).resolve())
    rd.root.mkdir(parents=True, exist_ok=True)
    cfg = cfg.model_copy(update={"run_dir": rd.root})
    if cfg.data.root is None:
        if cfg.data.dataset == "table":
            raise StageError("data.root: a bring-your-own table run needs --root FILE.parquet")
        kind, s = cfg.data.dataset, cfg.synth
        root = rd.synthetic_root(kind)
        done = root / ".synthetic-complete.json"
        # write_synthetic's arguments: the synth section with the run's seed and Biovid part (in this order)
        params = {"subjects": s.subjects, "seed": cfg.seed, "samples_per_class": s.samples_per_class}
        params |= {"part": cfg.data.part, **s.model_dump(exclude={"subjects", "samples_per_class"})}
        if kind == "biovid" and cfg.data.task == "binary":  # the windows the task reads: BL1 and PA4
            params["classes"] = [BIOVID_CLASSES[0], BIOVID_CLASSES[-1]]
        marker = {"kind": kind, **params, "generator_version": GENERATOR_VERSION}
        if not done.is_file() or json.loads(done.read_text()) != marker:
            status.info("generating a synthetic %s set (%d subjects) in %s", kind, s.subjects, root)
            remove_stale(root)
            # the same files whatever the number of processes writing them
            write_synthetic(kind, root, **params, workers=os.cpu_count() or 1)
            atomic_write_json(done, marker, indent=None)
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"root": root.resolve()})})
    if cfg.data.dataset == "table" and cfg.data.task == "multiclass" and cfg.data.num_classes is None:
        data = cfg.data.model_copy(update={"num_classes": infer_num_classes(Path(cfg.data.root))})
        cfg = cfg.model_copy(update={"data": data})
    atomic_write_text(rd.config, cfg.yaml_text())
    return cfg
