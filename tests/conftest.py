"""Test-wide settings: TensorFlow backend by default, Triton kernels interpreted on CPU."""

import os

import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# No GPU on CI: run the Triton kernels through the interpreter on CPU torch tensors.
# Must be set before triton is first imported.
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session", autouse=True)
def _interpreted_launches_one_at_a_time():
    """Tests launch kernels from several threads (the GPU tier's insert thread, servers):
    under the interpreter those launches must take turns. Applied once the test modules are
    imported, so they import TensorFlow and Triton in their own order."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        try:
            import triton  # noqa: F401
        except ImportError:
            return
        from keras_hps.triton_interpreter import serialize_interpreted_launches

        serialize_interpreted_launches()
