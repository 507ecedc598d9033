"""edgegen.runtime: the lean side (numpy, onnxruntime, tokenizers, pillow). No torch here, ever."""

try:
    import onnxruntime as _ort  # noqa: F401
except ImportError as _e:  # pip installs none on a Jetson, where JetPack's GPU build is the one to use
    raise ImportError(
        "edgegen.runtime | onnxruntime is not installed. Note: on a Jetson install JetPack's "
        "onnxruntime-gpu wheel (docs/jetson.md); elsewhere `pip install onnxruntime`"
    ) from _e
from . import diffusion as _diffusion  # registers the diffusion family's pipeline  # noqa: F401
from . import gan as _gan  # registers the gan family's pipeline  # noqa: F401
from .bundle import SCHEMA, Bundle
from .errors import (
    BackendUnavailableError,
    BadBundleError,
    BadInputError,
    CheckpointError,
    EdgegenError,
    EngineMismatchError,
    ValidationFailedError,
)
from .pipeline import Pipeline, TruncationWarning, UnknownSubjectWarning

__version__ = "0.1.0"

__all__ = [
    "Pipeline",
    "Bundle",
    "SCHEMA",
    "EdgegenError",
    "BadInputError",
    "BadBundleError",
    "EngineMismatchError",
    "BackendUnavailableError",
    "ValidationFailedError",
    "CheckpointError",
    "TruncationWarning",
    "UnknownSubjectWarning",
    "__version__",
]
