"""losslab.convergence — training-dynamics analysis and tiered checkpoints.

Checkpoints: :class:`TieredCheckpointManager` saves the complete training state atomically on
Orbax with per-leaf SHA-256 checksums verified at restore, tiers preliminary → observation →
candidate → release with their own retention, emergency saves, and rollback.

Analysis: loss-trajectory fingerprints (noise-aware derivatives with error bands, jumps,
update cosine similarity), the phase lag between loss and a downstream metric with an interval
or "not identifiable", hysteresis areas, multi-scale windowed evidence (rolling-quantile
baseline, EWMA, local-level Kalman filter, stationarity test), an exact Bayesian convergence
network over numpyro factors with conflict rules and an audit log, anomaly detection with an
``anomaly_guard`` transformation, and checks on recorded series (activation entropy and
distance, mapping consistency, a performance forecast, ``detect_forgetting``). The streaming
parts are also optax transformations (``trajectory_monitor``, ``evidence_monitor``,
``anomaly_guard``).

:class:`Monitor` puts the pieces together for any training loop: evidence → the network's
verdict and checkpoint tier, an anomaly → emergency checkpoint → rollback, with its host-side
state explicit.
"""

# Tiered, checksummed checkpoints.
from convergence._checkpoint import CHECKPOINT_TIERS
from convergence._checkpoint import CheckpointRecord
from convergence._checkpoint import CheckpointSaveError
from convergence._checkpoint import CorruptCheckpointError
from convergence._checkpoint import Restored
from convergence._checkpoint import TieredCheckpointManager
from convergence._checkpoint import TierRetention
# Loss-trajectory fingerprints: derivatives, jumps, update cosines.
from convergence._trajectory import cosine_profile
from convergence._trajectory import CosineProfile
from convergence._trajectory import detect_jumps
from convergence._trajectory import Fingerprint
from convergence._trajectory import fingerprint_from_jsonl
from convergence._trajectory import Jumps
from convergence._trajectory import local_derivatives
from convergence._trajectory import trajectory_monitor
from convergence._trajectory import trajectory_tracker
from convergence._trajectory import TrajectoryInfo
from convergence._trajectory import TrajectoryMonitorState
from convergence._trajectory import TrajectoryState
from convergence._trajectory import TrajectoryTracker
# Phase lag and hysteresis between the loss and a downstream metric.
from convergence._lag import estimate_lag
from convergence._lag import hysteresis_area
from convergence._lag import HysteresisLoops
from convergence._lag import IDENTIFIED
from convergence._lag import LagEstimate
from convergence._lag import NOT_IDENTIFIABLE
# Multi-scale windowed evidence.
from convergence._windows import batch_means_trend_test
from convergence._windows import Evidence
from convergence._windows import evidence_monitor
from convergence._windows import evidence_tracker
from convergence._windows import EvidenceInfo
from convergence._windows import EvidenceState
from convergence._windows import EvidenceTracker
from convergence._windows import ewma
from convergence._windows import IMPROVING
from convergence._windows import local_level_filter
from convergence._windows import MetricSpec
from convergence._windows import rolling_quantiles
from convergence._windows import STABLE
from convergence._windows import WORSENING
# The Bayesian convergence network and its audit log.
from convergence._network import AuditLog
from convergence._network import CauseRule
from convergence._network import Conflict
from convergence._network import ConflictContext
from convergence._network import convergence_network
from convergence._network import ConvergenceNetwork
from convergence._network import ConvergenceTables
from convergence._network import DECISION_CONVERGED
from convergence._network import DECISION_NOT_CONVERGED
from convergence._network import decision_record
from convergence._network import DEFAULT_RULES
from convergence._network import default_tables
from convergence._network import fit_tables
from convergence._network import FittedTables
from convergence._network import NetworkInfo
from convergence._network import NetworkState
from convergence._network import NODES
from convergence._network import Posterior
from convergence._network import posterior
from convergence._network import soft_likelihood
# Anomalies, the guard, and checks on recorded series.
from convergence._anomaly import activation_distance
from convergence._anomaly import activation_entropy
from convergence._anomaly import anomaly_detector
from convergence._anomaly import anomaly_guard
from convergence._anomaly import AnomalyDetector
from convergence._anomaly import AnomalyGuardInfo
from convergence._anomaly import AnomalyGuardState
from convergence._anomaly import AnomalyInfo
from convergence._anomaly import AnomalyState
from convergence._anomaly import detect_forgetting
from convergence._anomaly import Forecast
from convergence._anomaly import forecast_performance
from convergence._anomaly import Forgetting
from convergence._anomaly import mapping_consistency
from convergence._anomaly import MappingConsistency
from convergence._anomaly import REASON_LEVEL_SHIFT
from convergence._anomaly import REASON_NAMES
from convergence._anomaly import reason_names
from convergence._anomaly import REASON_NONE
from convergence._anomaly import REASON_NONFINITE
from convergence._anomaly import REASON_SPIKE
from convergence._anomaly import REASON_UNSTABLE_LR
# The monitor: evidence → verdict, anomaly → emergency checkpoint → rollback.
from convergence._monitor import ACTION_EMERGENCY_SAVE
from convergence._monitor import ACTION_ROLLBACK
from convergence._monitor import ACTION_STOP
from convergence._monitor import Actions
from convergence._monitor import HostState
from convergence._monitor import Monitor
from convergence._monitor import MonitoredMetric
from convergence._monitor import MonitorOutput
from convergence._monitor import MonitorState
from convergence._monitor import reason_mask
from convergence._monitor import tier_level

# Building blocks (``_network.joint_log_table``, ``_network.decay_evidence``,
# ``_network.unknown_context``, ``_windows.steady_state_gain``, ``_anomaly.robust_zscore``,
# ``_checkpoint.retained_steps``, ``_checksum.state_fingerprints``, ...) stay importable from
# their modules.
__all__ = (
    "ACTION_EMERGENCY_SAVE",
    "ACTION_ROLLBACK",
    "ACTION_STOP",
    "Actions",
    "activation_distance",
    "activation_entropy",
    "anomaly_detector",
    "anomaly_guard",
    "AnomalyDetector",
    "AnomalyGuardInfo",
    "AnomalyGuardState",
    "AnomalyInfo",
    "AnomalyState",
    "AuditLog",
    "batch_means_trend_test",
    "CauseRule",
    "CHECKPOINT_TIERS",
    "CheckpointRecord",
    "CheckpointSaveError",
    "Conflict",
    "ConflictContext",
    "convergence_network",
    "ConvergenceNetwork",
    "ConvergenceTables",
    "CorruptCheckpointError",
    "cosine_profile",
    "CosineProfile",
    "DECISION_CONVERGED",
    "DECISION_NOT_CONVERGED",
    "decision_record",
    "DEFAULT_RULES",
    "default_tables",
    "detect_forgetting",
    "detect_jumps",
    "estimate_lag",
    "Evidence",
    "evidence_monitor",
    "evidence_tracker",
    "EvidenceInfo",
    "EvidenceState",
    "EvidenceTracker",
    "ewma",
    "Fingerprint",
    "fingerprint_from_jsonl",
    "fit_tables",
    "FittedTables",
    "Forecast",
    "forecast_performance",
    "Forgetting",
    "HostState",
    "hysteresis_area",
    "HysteresisLoops",
    "IDENTIFIED",
    "IMPROVING",
    "Jumps",
    "LagEstimate",
    "local_derivatives",
    "local_level_filter",
    "mapping_consistency",
    "MappingConsistency",
    "MetricSpec",
    "Monitor",
    "MonitoredMetric",
    "MonitorOutput",
    "MonitorState",
    "NetworkInfo",
    "NetworkState",
    "NODES",
    "NOT_IDENTIFIABLE",
    "Posterior",
    "posterior",
    "REASON_LEVEL_SHIFT",
    "reason_mask",
    "REASON_NAMES",
    "reason_names",
    "REASON_NONE",
    "REASON_NONFINITE",
    "REASON_SPIKE",
    "REASON_UNSTABLE_LR",
    "Restored",
    "rolling_quantiles",
    "soft_likelihood",
    "STABLE",
    "tier_level",
    "TieredCheckpointManager",
    "TierRetention",
    "trajectory_monitor",
    "trajectory_tracker",
    "TrajectoryInfo",
    "TrajectoryMonitorState",
    "TrajectoryState",
    "TrajectoryTracker",
    "WORSENING",
)
