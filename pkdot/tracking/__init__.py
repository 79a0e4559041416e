"""MLflow: the only package of pkdot that imports :mod:`mlflow`. :mod:`~pkdot.tracking.runs` is the run
lifecycle (store, experiment, parent and stage runs, what the stages log); :mod:`~pkdot.tracking.registry` the
model registry (registration, model card, champion rule, loading a student back)."""

from pkdot.tracking.registry import (  # noqa: F401 - what the rest of pkdot uses
    DatasetSplit,
    load_student,
    model_config_path,
    model_version,
    register_best,
    register_student,
    require_existing_store,
)
from pkdot.tracking.runs import (  # noqa: F401
    EXPERIMENT_KIND,
    PARENT_FILE,
    PUBLIC_URI_ENV,
    Tracker,
    end_parent_run,
    log_evaluation,
    log_jobs,
    log_stage,
    resolve_public_uri,
    resolve_tracking_uri,
    run_ui_url,
)
