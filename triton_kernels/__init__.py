"""Triton GPU kernels for the embedding cache, with their NumPy references.

Imports only triton, torch and numpy. Installed as `keras_hps.triton_kernels`. Importing it
changes nothing else: the owners of device memory live in `keras_hps` (`gpu_cache`,
`gpu_static_table`), and running the kernels through Triton's interpreter from several threads
is set up by whoever needs it (`keras_hps.triton_interpreter`).
"""
