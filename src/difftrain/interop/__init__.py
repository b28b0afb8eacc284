"""Interoperability with diffusers: export a run as a diffusers folder, and start training from diffusers weights.

diffusers is an optional dependency (`pip install difftrain[diffusers]`); it is imported only inside the
functions that need it. `convert` and `convert_dit` hold the weight rename tables.
"""
