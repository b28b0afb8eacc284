"""difftrain: train, sample and evaluate image diffusion models from scratch."""

__version__ = "0.1.0"
