"""medseg: self-configuring medical image segmentation."""

__version__ = "0.1.0"
