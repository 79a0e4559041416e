"""Stage ``refit``: the configuration chosen on validation, retrained on every subject, and registered (the model
to ship is the procedure refit on all the data). ``RUN/refit/`` is a run directory of its own (manifest and
features linked) with one fold over every subject: a validation carve-out selects epochs, no test part (the
estimate is ``evaluate``'s). First training seed only; ``train.refit: false`` skips it. Its teacher does not
depend on the choice, so ``train-teacher`` trains it beside the fold teachers (:func:`prepare_refit`); this stage
trains the chosen student."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

from pkdot import folds
from pkdot.config import RunConfig
from pkdot.data.manifest import read_manifest
from pkdot.evaluate.report import read_summary
from pkdot.pipeline.base import Stage, StageOutput
from pkdot.pipeline.evaluate import register
from pkdot.rundir import RunDir, atomic_write_text
from pkdot.tracking.runs import end_parent_run
from pkdot.train import ray_runner
from pkdot.train.cache import build_stale_caches
from pkdot.train.jobs import student_jobs


def refit_config(cfg: RunConfig, loss: str | None = None) -> RunConfig:
    """The run config of ``RUN/refit/``: the chosen loss (None: as configured), the first training seed, every
    fold's subjects."""
    train = cfg.train.model_copy(update={"seeds": cfg.train.seeds[:1], "max_folds": None})
    distill = cfg.distill.model_copy(update={"losses": [loss] if loss else cfg.distill.losses})
    return cfg.model_copy(
        update={"run_dir": RunDir(cfg.run_dir).refit.root, "train": train, "distill": distill}
    )


def prepare_refit(cfg: RunConfig) -> tuple[RunConfig, folds.FoldPlan]:
    """``RUN/refit/`` made ready for its teacher (features and manifest linked, its one fold written); its config
    and plan."""
    rd = RunDir(cfg.run_dir)
    rcfg, refit = refit_config(cfg), rd.refit
    refit.features.parent.mkdir(parents=True, exist_ok=True)
    for target, link in ((rd.features, refit.features), (rd.manifest, refit.manifest)):
        link.unlink(missing_ok=True)  # an older link
        link.symlink_to(os.path.relpath(target, link.parent))
    subjects = read_manifest(rd.manifest)["subject_id"].astype(str)
    seed = rcfg.train.seeds[0]
    fold = replace(folds.refit_fold(subjects, cfg.train.val_fraction, cfg.seed), seed=seed)
    if folds.crossfit_groups_of(rcfg) is not None:
        fold = folds.assign_crossfit_groups(fold, rcfg.distill.crossfit_groups, cfg.seed)
    plan = folds.FoldPlan(by_seed={seed: (fold,)})
    folds.save_folds(plan, refit.splits)
    return rcfg, plan


def run(cfg: RunConfig) -> StageOutput:
    rd = RunDir(cfg.run_dir)
    if not cfg.train.refit:
        return StageOutput(
            [], {"refit": "off (train.refit: false): evaluate registered the best-validation fold model"}
        )
    summary = read_summary(rd)
    if (sel := summary.selection) is None:
        return StageOutput([], {"refit": "no student to refit"})
    rcfg = refit_config(cfg, sel.loss)
    atomic_write_text(rd.refit.config, rcfg.yaml_text())
    plan = folds.load_fold_plan(rd.refit.splits)  # train-teacher wrote it, and trained the refit's teacher
    seed = rcfg.train.seeds[0]
    fold = plan.fold(seed, 0)
    build_stale_caches(rcfg, plan.pairs(rcfg.train.seeds))
    jobs = student_jobs(rcfg, plan, [sel.loss])
    ray_runner.run_jobs_on_ray(rcfg, "student", jobs, name="refit-student")
    details: dict[str, Any] = {"loss": sel.loss, "subjects": len(fold.train) + len(fold.val)}
    if cfg.tracking.register_model:
        subjects = {"train": fold.train, "val": fold.val}
        on = f"all {details['subjects']} subjects (refit; {len(fold.val)} of them for epoch selection)"
        details |= register(cfg, summary, rcfg, sel.loss, fold.index, seed, subjects=subjects, trained_on=on)
    end_parent_run(cfg.run_dir, "FINISHED")
    return StageOutput([j.done_marker for j in jobs], details)


STAGE = Stage(
    name="refit",
    sections=("seed", "data", "features", "model", "train", "distill", "tracking"),
    code=("models", "train", "folds.py", "scheduler.py", "ray_utils.py", "tracking", "pipeline/evaluate.py"),
    output=lambda rd: rd.refit.root,
    body=run,
    # its student (another choice, other data); the refit's teacher and fold are train-teacher's
    stale=lambda cfg, options: [
        (r := RunDir(cfg.run_dir).refit).students,
        r.embeddings,
        r.ray_runs("refit-student"),
    ],
    help="The configuration chosen on validation, retrained on every subject and registered",
)
