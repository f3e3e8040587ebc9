"""A model server that answers TensorFlow Serving's REST and gRPC APIs.

Installed as `keras_hps.serving`.
"""
