"""The demo end to end at a small size: train, export (external tables), serve in a
subprocess, query over gRPC and REST, compare with the trained model, read tier counters."""

from __future__ import annotations

import argparse

import pytest

pytest.importorskip("tensorflow_serving")


def test_demo_small(tmp_path, capsys):
    from keras_hps.serving import demo

    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args(
        ["--workdir", str(tmp_path), "--samples", "2048", "--epochs", "1", "--max-rows", "300",
         "--query-batch", "64"]
    )
    code = demo.run(args)
    out = capsys.readouterr().out
    assert code == 0, out
    for step in range(1, 8):
        assert f"[{step}/7]" in out
    assert "-> MATCH" in out
    assert "serving_default takes raw keys: C1: int64 [?,1]" in out
    assert "(27 inputs)" in out
    # the host tier started at 10% of each table: the cold tier must have served some keys
    cold = next(line for line in out.splitlines() if line.strip().startswith("cold"))
    assert int(cold.split()[2]) > 0, out
    assert "unknown keys answered with the default vector:" in out
    assert "server exited with code 0" in out
