"""Evaluation: task metrics, fold aggregation, plots and the report."""
