# SPDX-License-Identifier: Apache-2.0
"""How the plugin gets its CUDA ops where no prebuilt vllm_gqsa._C is installed: the JIT build's
preconditions and its failure modes, on the CPU (torch's ``load`` is replaced by a recorder, and
a CUDA build of torch with a GPU is pretended where the test needs one)."""

from __future__ import annotations

import fcntl
import threading
import time
from pathlib import Path

import pytest
import torch

from vllm_gqsa.kernels import cuda


@pytest.fixture
def jit(monkeypatch, tmp_path):
    """A JIT build that would run (no blocker, a GPU), with torch's ``load`` recording its calls
    and whether torch's lock file was there when it started."""
    import torch.utils.cpp_extension as cpp

    calls = []
    monkeypatch.setattr(cuda, "_jit_blocker", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpp, "load", lambda **kw: calls.append(Path(kw["build_directory"], "lock").exists()))
    monkeypatch.setenv("VLLM_GQSA_CACHE", str(tmp_path / "cache"))
    return calls


def test_a_lock_left_by_a_killed_build_is_removed(jit):
    build_dir = cuda._cache_dir()
    build_dir.mkdir(parents=True)
    (build_dir / "lock").write_text("")  # torch's builds would wait on it forever
    ok, reason = cuda._jit_build()
    assert ok and jit == [False], reason


def test_a_running_build_is_waited_for(jit):
    """A second process waits for the first one's build (the OS lock), then loads its result."""
    build_dir = cuda._cache_dir()
    build_dir.mkdir(parents=True)
    result = []
    with open(build_dir / "build.flock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        waiter = threading.Thread(target=lambda: result.append(cuda._jit_build()))
        waiter.start()
        time.sleep(0.5)
        assert not jit and waiter.is_alive()
    waiter.join(10)
    assert result and result[0][0] and jit == [False]


def test_a_cache_it_cannot_write_falls_back_with_the_reason(jit, monkeypatch, tmp_path):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("VLLM_GQSA_CACHE", str(tmp_path / "file" / "cache"))
    ok, reason = cuda._jit_build()
    assert not ok and not jit and "JIT build of the GQSA CUDA ops failed" in reason and "file" in reason


def test_a_user_without_a_home_falls_back_or_uses_the_cache_variable(jit, monkeypatch):
    """An arbitrary container UID has no home: Path.home() raises."""
    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", no_home)
    assert cuda._jit_build()[0]  # VLLM_GQSA_CACHE is set: home is never asked
    monkeypatch.delenv("VLLM_GQSA_CACHE")
    ok, reason = cuda._jit_build()
    assert not ok and "home directory" in reason


def test_nvcc_of_another_cuda_than_torchs_blocks_the_build(monkeypatch):
    monkeypatch.setattr(cuda, "_nvcc_release", lambda nvcc: "13.0")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    import torch.utils.cpp_extension as cpp

    if cpp.CUDA_HOME is None and cuda.shutil.which("nvcc") is None:
        pytest.skip("no nvcc here")
    assert "is CUDA 13.0 but torch was built with CUDA 12.8" in cuda._jit_blocker()
    monkeypatch.setattr(torch.version, "cuda", "13.2")
    assert cuda._jit_blocker() is None


def test_nvcc_release_is_read_from_its_version_text(tmp_path):
    nvcc = tmp_path / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 13.0, V13.0.48'\n")
    nvcc.chmod(0o755)
    assert cuda._nvcc_release(str(nvcc)) == "13.0"
    assert cuda._nvcc_release(str(tmp_path / "missing")) is None


def test_a_prebuilt_extension_that_does_not_load_is_named(monkeypatch):
    """A _C built against another torch fails to import (undefined symbols): the reason says so,
    not only why the JIT build could not replace it."""
    import importlib.util
    import sys

    monkeypatch.setattr(cuda, "_jit_build", lambda: (False, "nvcc was not found"))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "vllm_gqsa._C" else real_find_spec(name, *a))
    monkeypatch.setitem(sys.modules, "vllm_gqsa._C", None)  # import raises ImportError
    ok, reason = cuda._load()
    assert not ok and reason.startswith("the prebuilt vllm_gqsa._C does not load") and "nvcc was not found" in reason
