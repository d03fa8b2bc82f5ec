"""The bounded names of the backend layer, importable without torch (the server's metrics
use them as label values)."""

BACKEND_NAMES = ("torch", "onnxruntime", "tensorrt")
BACKEND_CHOICES = (*BACKEND_NAMES, "auto")
ACCELERATED_BACKENDS = ("onnxruntime", "tensorrt")
# Why a backend could not serve (BackendUnavailableError.reason).
FALLBACK_REASONS = ("not_installed", "no_cuda", "build_failed", "refit_failed", "canary_failed")
