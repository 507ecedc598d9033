"""edgegen.export: the torch side (families, ONNX export, validation). Needs the `export` extra."""

from .default import default_bundle
from .exporter import export_checkpoint

__all__ = ["export_checkpoint", "default_bundle"]
