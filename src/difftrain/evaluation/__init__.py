"""Evaluation of samples and models. Imports no training code.

- `digits`: offline digit metric (classifier accuracy, Fréchet distance, near-copies).
- `frechet`: Fréchet distance between Gaussians fitted to features (shared by FID).
- `fidelity`: FID / KID / IS / precision-recall through torch-fidelity, when installed.
- `samples`: reading guided-diffusion `.npz` sample batches.
- `report`: `difftrain eval`'s entry point: picks a metric, runs it, formats the result.

Submodules are imported where used, so importing this package stays cheap.
"""


class EvaluationError(RuntimeError):
    """An evaluation cannot run (unreadable samples, missing metric weights); the message says how to fix it."""
