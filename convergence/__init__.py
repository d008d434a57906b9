"""losslab.convergence — training-dynamics analysis (coming in a later issue).

Planned: loss-trajectory fingerprints, phase lag between loss and downstream metrics,
multi-scale windowed evidence, a numpyro Bayesian convergence network, anomaly-triggered
emergency checkpoints, and tiered Orbax checkpoints with exact resume.
"""
