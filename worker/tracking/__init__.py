"""Experiment tracking: a job's params, metrics and final weights logged to MLflow."""
