"""petlbench: memory, speed, parameters and accuracy of PETL methods for timm Vision Transformers."""

from importlib import metadata

try:
    __version__ = metadata.version("petlbench")
except metadata.PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0"
