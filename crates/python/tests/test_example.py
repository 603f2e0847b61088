"""`examples/train_pgps.py` trains a plain PyTorch 3D U-Net with PGPS from a daemon (here at a
small size: the README's full run takes about a minute and a half on 2 cores), and resumes from
its checkpoint where it stopped."""

from __future__ import annotations

import re
import subprocess

import pytest

from conftest import PYTHON, ROOT, python_env

pytest.importorskip("torch")


def test_the_pgps_example_trains_and_resumes(daemon, tmp_path):
    checkpoint = tmp_path / "run.pt"
    cmd = [PYTHON, str(ROOT / "examples/train_pgps.py"), "--endpoint", daemon.endpoint, "--dataset", "phantom",
           "--final-patch", "16,16,16", "--pools", "3,3,3", "--epochs", "4", "--iters", "2",
           "--checkpoint", str(checkpoint)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=python_env(), timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    patches = re.findall(r"epoch\s+\d+\s+patch\s+(\S+)\s+loss\s+(\S+)", out.stdout)
    import patchflow

    s = patchflow.schedule(final_patch=16, pools=3, epochs=4, batch=2)
    expected = ["x".join(map(str, s.stage_for(e).patch)) for e in range(4)]
    assert [p for p, _ in patches] == expected, out.stdout
    assert len(set(expected)) > 1, "the patch grows"
    assert all(float(loss) == float(loss) for _, loss in patches), "finite losses"
    assert "trained 4 epochs" in out.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, env=python_env(), timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resumed at epoch 4" in again.stdout and "trained 0 epochs" in again.stdout
