"""Audits of image-classifier checkpoints: prediction depth, Hessian spectrum and transfer."""

__version__ = "0.1.0"
