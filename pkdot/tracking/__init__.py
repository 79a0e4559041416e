"""MLflow: the only package of pkdot that imports :mod:`mlflow`. :mod:`~pkdot.tracking.runs` is the run
lifecycle (store, experiment, parent and stage runs, what the stages log); :mod:`~pkdot.tracking.registry` the
model registry (registration, model card, champion rule, loading a student back)."""
