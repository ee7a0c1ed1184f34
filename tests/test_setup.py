"""The environment `make` builds: CPU torch as pinned, DeepSpeed with its CPU comm op prebuilt."""

from __future__ import annotations

import importlib.util
import os


def test_torch_is_the_pinned_build():
    import torch

    assert torch.__version__.split("+")[0] == os.environ.get("KILN_EXPECT_TORCH", "2.13.0")


def test_deepspeed_cpu_comm_op_is_prebuilt():
    """Built once at install (DS_BUILD_SHM_COMM=1), so no gloo init compiles it (~100 s) at run time."""
    spec = importlib.util.find_spec("deepspeed")
    assert spec is not None, "deepspeed is not installed"
    ops = os.path.join(os.path.dirname(spec.origin), "ops", "comm")
    assert any(n.startswith("deepspeed_shm_comm_op") and n.endswith(".so") for n in os.listdir(ops)), os.listdir(ops)


def test_console_script_installed():
    import shutil
    import sys

    assert shutil.which("kiln", path=os.path.dirname(sys.executable)), "the `kiln` console script is missing"
