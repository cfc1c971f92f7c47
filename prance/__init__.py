"""prance: adaptive compression of Vision Transformers (PRANCE, PPT, ToMe) with
distributed budget sweeps."""

__version__ = "0.1.0"
