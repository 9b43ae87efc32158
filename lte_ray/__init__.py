"""lte-ray: LoRA-the-Explorer on Ray."""

__version__ = "0.1.0"
