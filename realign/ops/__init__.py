"""Pure tensor math on weights and adapters: no MLflow, no TRL, no files. Stages call these and log the results."""
