"""The version of nsg-gpu, for the package, its outputs and its workers."""

__all__ = ["__version__"]

__version__ = "0.1.0"
