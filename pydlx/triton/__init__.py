"""Triton kernels and their launchers (no autograd, no modules). Imported lazily: triton is optional."""
