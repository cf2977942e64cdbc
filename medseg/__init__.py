"""medseg: self-configuring medical image segmentation.

The Python API (:mod:`medseg.api`), imported on first use so that ``import medseg`` stays fast:
``load_model`` (→ :class:`~medseg.api.Model` with ``predict``), ``plan``, ``train``, ``evaluate``,
``export_model``, ``import_model``.
"""

import importlib

__version__ = "0.1.0"

__all__ = ["Model", "__version__", "evaluate", "export_model", "import_model", "load_model", "plan", "train"]


def __getattr__(name: str):
    if name in __all__ and name != "__version__":
        return getattr(importlib.import_module("medseg.api"), name)
    raise AttributeError(f"module 'medseg' has no attribute {name!r}")
