"""The Jacobian engine: vjp/jvp, full and per-sample Jacobians, estimators (here), verification
(:mod:`jacaudit.engine.verify`), local linearity (:mod:`jacaudit.engine.linearity`) and the summary
of a Jacobian (:mod:`jacaudit.engine.summary`). Imports torch."""
from .core import (DEFAULT_MAX_MEMORY, JacobianInfo, JacobianTooLarge, Target, full_jacobian, jacobian, jvp,
                   parse_memory, per_sample_jacobian, prepare, vjp)
from .estimators import FrobeniusEstimate, SingularEstimate, frobenius_norm, spectral_norm, top_singular

__all__ = ["jacobian", "vjp", "jvp", "per_sample_jacobian", "prepare", "full_jacobian", "Target", "JacobianInfo",
           "JacobianTooLarge", "parse_memory", "DEFAULT_MAX_MEMORY", "frobenius_norm", "spectral_norm",
           "top_singular", "FrobeniusEstimate", "SingularEstimate"]
