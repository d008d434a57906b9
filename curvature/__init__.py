"""losslab.curvature — loss-landscape curvature as pure, jit-compatible functions on pytrees.

Critical sharpness (Kalra et al. 2026, arXiv 2601.16979) from a few forward passes along the
optimizer's update, its relative form between tasks, a Lanczos Hessian baseline,
preconditioned and directional sharpness, Hutchinson trace, spectral density and
gradient-noise curvature; the probes that belong in a training step are also optax gradient
transformations.

Sign convention: ``direction`` Δθ is a descent direction at unit learning rate; the step is
``params - eta * direction``. ``loss_fn`` always takes the parameters only (bind the batch with a
closure, inside your jitted function, with the batch a traced argument).
"""

# Critical sharpness and its relative form between tasks.
from curvature._critical import critical_sharpness
from curvature._critical import CriticalSharpness
from curvature._critical import relative_critical_sharpness
from curvature._critical import relative_sharpness_band
from curvature._critical import relative_sharpness_matrix
from curvature._critical import sharpness_band
from curvature._critical import SharpnessBand
from curvature._critical import STATUS_MAX_EVALS
from curvature._critical import STATUS_NAMES
from curvature._critical import STATUS_NO_RISE
from curvature._critical import STATUS_NONFINITE
from curvature._critical import STATUS_NOT_DESCENT
from curvature._critical import STATUS_OK
from curvature._critical import STATUS_UNRESOLVED
# The probes as optax gradient transformations.
from curvature._transforms import critical_sharpness_probe
from curvature._transforms import CriticalSharpnessInfo
from curvature._transforms import CriticalSharpnessProbeState
from curvature._transforms import probe_metrics
from curvature._transforms import relative_sharpness_probe
from curvature._transforms import RelativeSharpnessInfo
from curvature._transforms import RelativeSharpnessProbeState
from curvature._transforms import scale_by_critical_sharpness
from curvature._transforms import ScaleByCriticalSharpnessState
# Hessian baselines: products, Lanczos eigenvalues, trace and spectral density.
from curvature._hvp import directional_sharpness
from curvature._hvp import hvp
from curvature._lanczos import hessian_eigenvalues
from curvature._lanczos import HessianEigenvalues
from curvature._lanczos import top_eigenpairs
from curvature._stochastic import hessian_trace
from curvature._stochastic import HessianTrace
from curvature._stochastic import spectral_density
from curvature._stochastic import SpectralDensity
# Preconditioned sharpness (Adam) and gradient-noise curvature.
from curvature._preconditioned import adam_preconditioner
from curvature._preconditioned import find_adam_state
from curvature._preconditioned import preconditioned_sharpness
from curvature._noise import gradient_noise_top_eigenvalue

# The building blocks (``_lanczos.lanczos_tridiag``, ``_tree``'s float32-accumulating pytree
# products, ...) stay importable from their modules; only what a user calls is listed here.
__all__ = (
    "adam_preconditioner",
    "critical_sharpness",
    "critical_sharpness_probe",
    "CriticalSharpness",
    "CriticalSharpnessInfo",
    "CriticalSharpnessProbeState",
    "directional_sharpness",
    "find_adam_state",
    "gradient_noise_top_eigenvalue",
    "hessian_eigenvalues",
    "hessian_trace",
    "HessianEigenvalues",
    "HessianTrace",
    "hvp",
    "preconditioned_sharpness",
    "probe_metrics",
    "relative_critical_sharpness",
    "relative_sharpness_band",
    "relative_sharpness_matrix",
    "relative_sharpness_probe",
    "RelativeSharpnessInfo",
    "RelativeSharpnessProbeState",
    "scale_by_critical_sharpness",
    "sharpness_band",
    "SharpnessBand",
    "ScaleByCriticalSharpnessState",
    "spectral_density",
    "SpectralDensity",
    "STATUS_MAX_EVALS",
    "STATUS_NAMES",
    "STATUS_NO_RISE",
    "STATUS_NONFINITE",
    "STATUS_NOT_DESCENT",
    "STATUS_OK",
    "STATUS_UNRESOLVED",
    "top_eigenpairs",
)
