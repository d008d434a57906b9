"""losslab.convergence — training-dynamics analysis and tiered checkpoints.

Checkpoints: :class:`TieredCheckpointManager` saves the complete training state atomically on
Orbax with per-leaf SHA-256 checksums verified at restore, tiers preliminary → observation →
candidate → release with their own retention, emergency saves, and rollback.

In progress (issue 3): loss-trajectory fingerprints, phase lag between loss and downstream
metrics, multi-scale windowed evidence, a numpyro Bayesian convergence network and anomaly
detection.
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
