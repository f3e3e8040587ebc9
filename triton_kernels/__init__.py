"""Triton GPU kernels for the embedding cache, with their NumPy references.

Imports only triton, torch and numpy. Installed as `keras_hps.triton_kernels`.
"""
