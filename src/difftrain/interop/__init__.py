"""Interoperability with diffusers: export a run as a diffusers folder (`export_run`), and start training
from existing weights, diffusers' included (`init_weights`, the `model.init_from` key).

diffusers is an optional dependency (`pip install difftrain[diffusers]`), imported only inside the functions
that need it; reading a diffusers folder for `init_weights` needs only safetensors. `convert` (ADM UNet <->
UNet2DModel), `convert_dit` (DiT <-> SD3 / FLUX transformers) and `convert_peer_dit` (diffusers' DiTTransformer2DModel
-> our DiT built with its options) hold the weight rename tables.
"""

from difftrain.interop.diffusers_export import export_run
from difftrain.interop.init_from import init_weights

__all__ = ["export_run", "init_weights"]
