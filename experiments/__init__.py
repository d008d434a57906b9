"""losslab.experiments — the runnable layer (models, data, trainer, CLI, plots)."""
