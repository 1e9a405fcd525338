"""MLflow: every model a run and a registered version; the champion moves only on a win."""
