"""losslab.convergence — training-dynamics analysis and tiered checkpoints.

Checkpoints: :class:`TieredCheckpointManager` saves the complete training state atomically on
Orbax with per-leaf SHA-256 checksums verified at restore, tiers preliminary → observation →
candidate → release with their own retention, emergency saves, and rollback.

Analysis: loss-trajectory fingerprints (noise-aware derivatives with error bands, jumps,
update cosine similarity), the phase lag between loss and a downstream metric with an interval
or "not identifiable", hysteresis areas, multi-scale windowed evidence (rolling-quantile
baseline, EWMA, local-level Kalman filter, stationarity test), an exact Bayesian convergence
network over numpyro factors with conflict rules and an audit log, anomaly detection with an
``anomaly_guard`` transformation, and activation / forecasting / forgetting probes. The
streaming parts are also optax transformations (``trajectory_monitor``, ``evidence_monitor``,
``anomaly_guard``).
"""

from convergence._checkpoint import CHECKPOINT_TIERS
from convergence._checkpoint import CheckpointRecord
from convergence._checkpoint import CheckpointSaveError
from convergence._checkpoint import CorruptCheckpointError
from convergence._checkpoint import Restored
from convergence._checkpoint import retained_steps
from convergence._checkpoint import TieredCheckpointManager
from convergence._checkpoint import TierRetention
from convergence._checksum import state_fingerprints
from convergence._trajectory import cosine_profile
from convergence._trajectory import CosineProfile
from convergence._trajectory import detect_jumps
from convergence._trajectory import Fingerprint
from convergence._trajectory import fingerprint_from_jsonl
from convergence._trajectory import Jumps
from convergence._trajectory import load_metric
from convergence._trajectory import local_derivatives
from convergence._trajectory import robust_noise_level
from convergence._trajectory import trajectory_monitor
from convergence._trajectory import trajectory_tracker
from convergence._trajectory import TrajectoryInfo
from convergence._trajectory import TrajectoryMonitorState
from convergence._trajectory import TrajectoryState
from convergence._trajectory import TrajectoryTracker
from convergence._lag import estimate_lag
from convergence._lag import hysteresis_area
from convergence._lag import HysteresisLoops
from convergence._lag import IDENTIFIED
from convergence._lag import LagEstimate
from convergence._lag import NOT_IDENTIFIABLE
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
from convergence._windows import MetricWindowState
from convergence._windows import rolling_quantiles
from convergence._windows import STABLE
from convergence._windows import steady_state_gain
from convergence._windows import WORSENING
from convergence._network import AuditLog
from convergence._network import CauseRule
from convergence._network import check_tables
from convergence._network import Conflict
from convergence._network import CONFLICT_PAIRS
from convergence._network import ConflictContext
from convergence._network import convergence_network
from convergence._network import ConvergenceNetwork
from convergence._network import ConvergenceTables
from convergence._network import decay_evidence
from convergence._network import decay_factors
from convergence._network import DECISION_CONVERGED
from convergence._network import DECISION_NOT_CONVERGED
from convergence._network import decision_record
from convergence._network import DEFAULT_RULES
from convergence._network import default_tables
from convergence._network import detect_conflict
from convergence._network import fit_tables
from convergence._network import FittedTables
from convergence._network import joint_log_table
from convergence._network import NetworkInfo
from convergence._network import NetworkState
from convergence._network import node_log_likelihood
from convergence._network import NODES
from convergence._network import Posterior
from convergence._network import posterior
from convergence._network import soft_likelihood
from convergence._network import unknown_context
from convergence._anomaly import activation_distance
from convergence._anomaly import activation_entropy
from convergence._anomaly import anomaly_detector
from convergence._anomaly import anomaly_guard
from convergence._anomaly import AnomalyDetector
from convergence._anomaly import AnomalyGuardInfo
from convergence._anomaly import AnomalyGuardState
from convergence._anomaly import AnomalyInfo
from convergence._anomaly import AnomalyState
from convergence._anomaly import Forecast
from convergence._anomaly import forecast_performance
from convergence._anomaly import forgetting_probe
from convergence._anomaly import ForgettingProbe
from convergence._anomaly import mapping_consistency
from convergence._anomaly import MappingConsistency
from convergence._anomaly import REASON_LEVEL_SHIFT
from convergence._anomaly import REASON_NAMES
from convergence._anomaly import reason_names
from convergence._anomaly import REASON_NONE
from convergence._anomaly import REASON_NONFINITE
from convergence._anomaly import REASON_SPIKE
from convergence._anomaly import REASON_UNSTABLE_LR
from convergence._anomaly import robust_zscore
from convergence._anomaly import STREAMS
