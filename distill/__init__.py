"""losslab.distill — distillation losses (coming in a later issue).

Planned: temperature soft targets with per-position weights, the KL / JSD / skew-KL family
chunked over large vocabularies, feature / relation / temporal losses, a gating network that
fuses loss terms, and a staged, metric-driven distillation strategy.
"""
