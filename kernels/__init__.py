"""bezoar's Triton kernels, each with a torch reference of the same signature beside it.

Installed under the import name ``bezoar_kernels``: a top-level ``kernels`` module would
collide with the PyPI ``kernels`` package that transformers and bitsandbytes import.
``dispatch`` is the one place that decides whether a call runs Triton or the reference.
"""
