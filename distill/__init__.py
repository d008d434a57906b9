"""losslab.distill — distillation losses, loss fusion and the staged distillation strategy.

Token level: forward / reverse KL, generalised JSD(β) (β = 0, 1 special-cased to the KLs),
skew KL and skew reverse KL (DistiLLM), soft-target KL with an explicit T² factor and Hinton's
mix with hard labels; padding masks and per-position float weights on every token loss; an
importance-weight generator (teacher entropy × token rarity into [0.2, 3.0], or a user's
tagger); and ``chunked_token_loss``, which works from the two models' final hidden states and
output projections over chunks of positions and never holds [B, T, V] logits for both models.

Feature, relation and temporal losses on intermediate slices collected from Flax NNX models
without rewriting them (``collect_intermediates``): cosine + angular, MMD with a
mixture-of-Gaussians kernel (median-heuristic bandwidths, or learned by ascent), L1
reconstruction through a learned head, layer maps with width projections and geometric depth
weights (``FeatureDistiller``; it and the cosine and L1 losses take the token losses'
``mask`` and ``weights``); MiniLM v2 relation distillation; a position-weighted smoothness
penalty, attention-evolution alignment by the nuclear norm and a documented interpretation of
"semantic path replay". Fusion: fixed
weights, uncertainty weighting (Kendall et al. 2018) and a gating network; the adaptive
strategy as optax pieces (clipping-mode switching, per-layer learning rates, accumulation)
and a checkpointable controller with an audit log. Every loss is computed in float32 (or
wider) whatever the input dtype.
"""

# Token-level divergences on logits.
from distill._divergences import forward_kl
from distill._divergences import generalized_jsd
from distill._divergences import hinton_loss
from distill._divergences import reverse_kl
from distill._divergences import skew_kl
from distill._divergences import skew_reverse_kl
from distill._divergences import soft_target_kl
from distill._divergences import token_loss
from distill._divergences import TOKEN_LOSSES
# The same losses from hidden states, over chunks of positions.
from distill._chunked import chunked_token_entropy
from distill._chunked import chunked_token_loss
# Per-position importance weights.
from distill._weights import importance_weights
from distill._weights import lookup_scorer
from distill._weights import Scorer
from distill._weights import token_counts
from distill._weights import token_entropy
# Feature, relation and temporal losses on intermediate slices.
from distill._features import attention_from_qkv
from distill._features import collect_intermediates
from distill._features import cosine_angular_loss
from distill._features import FeatureDistiller
from distill._features import geometric_layer_weights
from distill._features import layer_map
from distill._features import LOSS_KINDS
from distill._features import median_log_bandwidths
from distill._features import mmd
from distill._features import MMDKernel
from distill._features import reconstruction_l1
from distill._features import ReconstructionHead
from distill._features import SLICES
from distill._relation import minilm_relation_loss
from distill._temporal import attention_evolution_loss
from distill._temporal import path_replay_loss
from distill._temporal import smoothness_penalty
# Loss fusion.
from distill._fusion import FixedFusion
from distill._fusion import GatedFusion
from distill._fusion import LossFusion
from distill._fusion import runtime_feature_names
from distill._fusion import runtime_features
from distill._fusion import UncertaintyFusion
# The adaptive strategy: optax pieces, the controller and its audit log.
from distill._strategy import accumulate_gradients
from distill._strategy import AccumulateState
from distill._strategy import AccumulationRule
from distill._strategy import adaptive_controller
from distill._strategy import audit_records
from distill._strategy import clip_by_mode
from distill._strategy import ClipByModeState
from distill._strategy import ClipInfo
from distill._strategy import ClipRule
from distill._strategy import Controller
from distill._strategy import controller_transformation
from distill._strategy import ControllerInfo
from distill._strategy import ControllerState
from distill._strategy import ControllerTransformState
from distill._strategy import decision_args
from distill._strategy import GroupScheduleState
from distill._strategy import micro_batched_value_and_grad
from distill._strategy import per_layer_learning_rates
from distill._strategy import ReweightRule
from distill._strategy import set_clip_mode
from distill._strategy import StallRule
from distill._strategy import strategy_metrics
from distill._strategy import top_level_labels
from distill._strategy import update_ratios

# Building blocks (``_divergences.pointwise_loss``, ``_features.DEFAULT_SLICE_LOSSES``,
# ``_relation.relation_log_probs``, ``_temporal.attention_evolution``, ``_fusion.weighted_sum``,
# ``_strategy.scale_by_group_schedule``, ``_weights.weights_from_scores``, the constants that
# enumerate accepted argument values, ...) stay importable from their modules.
__all__ = (
    "accumulate_gradients",
    "AccumulateState",
    "AccumulationRule",
    "adaptive_controller",
    "attention_evolution_loss",
    "attention_from_qkv",
    "audit_records",
    "chunked_token_entropy",
    "chunked_token_loss",
    "clip_by_mode",
    "ClipByModeState",
    "ClipInfo",
    "ClipRule",
    "collect_intermediates",
    "Controller",
    "controller_transformation",
    "ControllerInfo",
    "ControllerState",
    "ControllerTransformState",
    "cosine_angular_loss",
    "decision_args",
    "FeatureDistiller",
    "FixedFusion",
    "forward_kl",
    "GatedFusion",
    "generalized_jsd",
    "geometric_layer_weights",
    "GroupScheduleState",
    "hinton_loss",
    "importance_weights",
    "layer_map",
    "lookup_scorer",
    "LOSS_KINDS",
    "LossFusion",
    "median_log_bandwidths",
    "micro_batched_value_and_grad",
    "minilm_relation_loss",
    "mmd",
    "MMDKernel",
    "path_replay_loss",
    "per_layer_learning_rates",
    "reconstruction_l1",
    "ReconstructionHead",
    "reverse_kl",
    "ReweightRule",
    "runtime_feature_names",
    "runtime_features",
    "Scorer",
    "set_clip_mode",
    "skew_kl",
    "skew_reverse_kl",
    "SLICES",
    "smoothness_penalty",
    "soft_target_kl",
    "StallRule",
    "strategy_metrics",
    "token_counts",
    "token_entropy",
    "token_loss",
    "TOKEN_LOSSES",
    "top_level_labels",
    "UncertaintyFusion",
    "update_ratios",
)
