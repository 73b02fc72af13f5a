"""Iterative training of image classifiers with the normal, LLF and SEAL strategies."""

__version__ = "0.1.0"
