"""Test-wide settings: TensorFlow backend by default, Triton kernels interpreted on CPU."""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# No GPU on CI: run the Triton kernels through the interpreter on CPU torch tensors.
# Must be set before triton is first imported.
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
