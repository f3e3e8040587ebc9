"""Dissect trained Keras models and write TF Serving model repositories.

Installed as `keras_hps.export`.
"""
