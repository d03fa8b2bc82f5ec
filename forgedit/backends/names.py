"""The bounded names of the backend layer, importable without torch (the server's metrics
use them as label values)."""

BACKEND_NAMES = ("torch", "onnxruntime", "tensorrt")
BACKEND_CHOICES = (*BACKEND_NAMES, "auto")
ACCELERATED_BACKENDS = ("onnxruntime", "tensorrt")
# Why a backend could not serve (BackendUnavailableError.reason): it cannot run here at all
# (not_installed, unsupported_version, no_cuda), its graph could not be built or loaded
# (build_failed), or a job found it wrong or broken (refit_failed, canary_failed, run_failed).
FALLBACK_REASONS = (
    "not_installed",
    "unsupported_version",
    "no_cuda",
    "build_failed",
    "refit_failed",
    "canary_failed",
    "run_failed",
)
# How far a fallback reaches: the replica's backend from now on, or one job's sampling.
FALLBACK_SCOPES = ("replica", "job")
