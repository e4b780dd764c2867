# SPDX-License-Identifier: Apache-2.0
"""The package as users get it. A wheel built without CUDA (the sdist, then the wheel from it, as
`make wheel` does) holds the plugin, the converter and the CUDA sources, and no tests or benchmarks;
installed into a fresh venv it works from its own files: `gqsa-convert --demo` runs, vLLM's plugin
loader registers gqsa, one log line says the CUDA kernels are missing and why, and the GQSA op
runs through its torch fallback. The Dockerfile's own steps are replayed the same way.

A fresh venv gets torch, vLLM and the other dependencies from the test's environment through a
folder of links to its site-packages that leaves vllm-gqsa (the checkout's editable install) out,
and runs away from the checkout: whatever vllm-gqsa it imports can only come from what was
installed into it. (Installing the dependencies for real would take minutes and a network.)"""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

import vllm_gqsa

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
CSRC_FILES = sorted(p.name for p in (ROOT / "csrc").iterdir() if p.suffix in (".cu", ".h", ".cpp"))

pytestmark = pytest.mark.slow


def run(cmd, cwd, env, timeout=300, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                       shell=isinstance(cmd, str))
    if check:
        assert r.returncode == 0, f"{cmd}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


def clean_env(extra_path: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env.update(PYTHONNOUSERSITE="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1",
               HF_HUB_OFFLINE="1", VLLM_GQSA_SKIP_CUDA_BUILD="1")
    if extra_path:
        env["PATH"] = f"{extra_path}{os.pathsep}{env.get('PATH', '')}"
    return env


def source_tree(dest: Path) -> Path:
    """The checkout's files as a clone plus uncommitted work would have them: no build/, egg-info
    or dist/ left over from earlier builds can leak into the package."""
    try:
        names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                               cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("the source tree is not a git checkout")
    for name in filter(None, names):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def fresh_venv(path: Path) -> Path:
    """A new venv, without pip of its own, that sees every package of the test's environment but
    vllm-gqsa (pip too, which then installs into the new venv). Returns its bin/ folder."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    deps = path / "deps"
    deps.mkdir()
    for site in {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}:
        for entry in Path(site).iterdir():
            if "vllm_gqsa" not in entry.name and entry.name != "converters" \
                    and not (deps / entry.name).exists():
                (deps / entry.name).symlink_to(entry)
    bin_dir = path / "bin"
    own_site = run([str(bin_dir / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                   path, clean_env()).stdout.strip()
    # addsitedir, not a plain path line, so that the dependencies' own .pth files run as they do
    # in the test's environment; it comes after the venv's own site-packages.
    (Path(own_site) / "zz_test_deps.pth").write_text(f"import site; site.addsitedir({str(deps)!r})\n")
    (bin_dir / "pip").write_text('#!/bin/sh\nexec "$(dirname "$0")/python" -m pip "$@"\n')
    (bin_dir / "pip").chmod(0o755)
    r = run([str(bin_dir / "python"), "-c", "import vllm_gqsa"], path, clean_env(), check=False)
    assert r.returncode != 0 and "No module named 'vllm_gqsa'" in r.stderr, "vllm-gqsa leaks into the venv"
    return bin_dir


# Runs in the fresh venv, away from the checkout. Prints what the test checks, as JSON.
INSTALLED_CHECK = r"""
import importlib.metadata as md, json, logging
import vllm.plugins  # configures vLLM's logging, which resets the handlers of loggers under "vllm."
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append([record.levelname, record.getMessage()])
logging.getLogger("vllm.gqsa").addHandler(Keep())

import converters, torch, vllm_gqsa
vllm.plugins.load_general_plugins()  # what every vLLM process does: runs vllm_gqsa:register
vllm_gqsa.register()  # vLLM may load plugins more than once per process: still one line
from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS
from vllm_gqsa.format import LayerFormat
from vllm_gqsa.kernels import cuda
from vllm_gqsa.kernels.cuda_format import to_kernel_format
from vllm_gqsa.random_layers import random_gqsa_layer
from vllm_gqsa.reference import dequantize

layer = random_gqsa_layer(64, 256, LayerFormat(), density=0.5)
t = to_kernel_format(layer, num_ctas=4)
x = torch.randn(3, 256)
y = torch.ops.vllm_gqsa.gqsa_mm(x, t["row_ptr"], t["codes"], t["meta"], t["schedule"], t["chunks"], 64, 16,
                                None, t["counters"], False, t["sell_rows"], t["slice_parts"],
                                t["sell_warps"].tolist())
eps = {ep.name: (ep.value, str(ep.dist.locate_file("")))
       for ep in md.entry_points(group="vllm.general_plugins")}
print(json.dumps({
    "files": [vllm_gqsa.__file__, converters.__file__],
    "version": vllm_gqsa.__version__, "metadata_version": md.version("vllm-gqsa"),
    "entry_point": eps.get("gqsa"), "registered": "gqsa" in QUANTIZATION_METHODS,
    "records": records, "available": cuda.available(), "csrc": str(cuda.CSRC_DIR),
    "fallback_error": (y - x @ dequantize(layer).T).abs().max().item(),
}))
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The sdist and the wheel built from it, without CUDA, as `make wheel` builds them."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = source_tree(tmp / "src")
    dist = tmp / "dist"
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(src)], tmp,
        clean_env(), timeout=600)
    (wheel,) = dist.glob("*.whl")
    return tmp, wheel


def test_wheel_holds_the_package_and_its_entry_points(built):
    _, wheel = built
    assert wheel.name == f"vllm_gqsa-{vllm_gqsa.__version__}-py3-none-any.whl"  # pure Python
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        info = f"vllm_gqsa-{vllm_gqsa.__version__}.dist-info"
        metadata = z.read(f"{info}/METADATA").decode()
        entry_points = configparser.ConfigParser()
        entry_points.read_string(z.read(f"{info}/entry_points.txt").decode())
    assert {n.split("/")[0] for n in names} == {"vllm_gqsa", "converters", info}
    for module in ("vllm_gqsa/__init__.py", "vllm_gqsa/quantization.py", "vllm_gqsa/kernels/cuda.py",
                   "converters/__init__.py", "converters/cli.py"):
        assert module in names
    assert sorted(n.split("/")[-1] for n in names if n.startswith("vllm_gqsa/csrc/")) == CSRC_FILES
    assert not any(n.endswith((".so", ".pyc")) for n in names)
    assert f"\nVersion: {vllm_gqsa.__version__}\n" in metadata
    assert dict(entry_points["vllm.general_plugins"]) == {"gqsa": "vllm_gqsa:register"}
    assert dict(entry_points["console_scripts"]) == {"gqsa-convert": "converters.cli:main"}


def test_compose_tags_the_image_with_the_package_version():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    assert compose["services"]["gqsa"]["image"] == f"vllm-gqsa:{vllm_gqsa.__version__}"


def test_wheel_installs_and_runs_in_a_fresh_venv(built):
    tmp, wheel = built
    venv = tmp / "venv-wheel"
    bin_dir = fresh_venv(venv)
    work = tmp / "work"  # neither the checkout nor the venv: nothing to import by accident
    work.mkdir()
    env = clean_env(bin_dir)
    run([str(bin_dir / "pip"), "install", "--no-deps", str(wheel)], work, env)

    demo = work / "gqsa-demo"
    run([str(bin_dir / "gqsa-convert"), "--demo", str(demo), "--quiet"], work, env)
    assert (demo / "gqsa_report.json").is_file() and (demo / "model.safetensors").is_file()

    out = json.loads(run([str(bin_dir / "python"), "-c", INSTALLED_CHECK], work, env).stdout.splitlines()[-1])
    site = str(venv.resolve())
    for f in out["files"]:
        assert f.startswith(site) and not f.startswith(str(ROOT)), f
    assert out["version"] == out["metadata_version"] == vllm_gqsa.__version__
    assert out["entry_point"][0] == "vllm_gqsa:register" and out["entry_point"][1].startswith(site)
    assert out["registered"]
    assert out["csrc"].startswith(site) and out["csrc"].endswith("vllm_gqsa/csrc")
    # This environment's torch is a CPU build: no kernels, said once, with the reason.
    assert out["available"][0] is False
    assert len(out["records"]) == 1, out["records"]
    level, message = out["records"][0]
    assert level == "WARNING" and "CPU build" in message and "torch fallback" in message, message
    assert out["fallback_error"] < 1e-4


def dockerfile_steps() -> list[tuple[str, str]]:
    """(instruction, arguments) of the Dockerfile, continuation lines joined."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    steps = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, args = line.partition(" ")
            steps.append((instruction.upper(), args.strip()))
    return steps


def test_dockerfile_steps_install_the_package_in_a_plain_venv(tmp_path):
    """The Dockerfile's ENV, WORKDIR, COPY and RUN steps replayed under a stand-in root folder,
    with the image's pip and python3 played by a fresh venv. There is no CUDA here, so the package
    builds without kernels and the Dockerfile's check of them must fail, on the installed package."""
    image_root = tmp_path / "root"
    bin_dir = fresh_venv(tmp_path / "venv")
    env = clean_env(bin_dir)
    del env["VLLM_GQSA_SKIP_CUDA_BUILD"]  # the build finds out for itself that torch has no CUDA
    workdir = image_root
    runs = []
    for instruction, args in dockerfile_steps():
        if instruction == "ENV":
            key, _, value = args.partition("=")
            env[key] = value.strip('"')
        elif instruction == "WORKDIR":
            workdir = image_root / args.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif instruction == "COPY":
            *sources, dest = args.split()
            target = workdir / dest
            for s in sources:
                if (ROOT / s).is_dir():
                    shutil.copytree(ROOT / s, target, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(ROOT / s, target)
        elif instruction == "RUN":
            runs.append((workdir, args))
            r = run(args, workdir, env, check=False)
            if "pip install" in args:
                assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
                continue
            # The kernel check: no _C here, so the image build would stop, and it looked for _C
            # in the installed package (with the CUDA sources for a JIT build), not the source copy.
            assert r.returncode != 0 and "No module named 'vllm_gqsa._C'" in r.stderr, r.stderr
            # The extension finds torch's libraries only once torch is loaded (libc10.so is not
            # found otherwise, as seen on a GPU machine), which this machine cannot show.
            assert 0 <= args.find("import torch") < args.find("vllm_gqsa._C"), args
            where = Path(run([str(bin_dir / "python"), "-c", "import vllm_gqsa; print(vllm_gqsa.__file__)"],
                             workdir, env).stdout.strip()).parent
            assert where.is_relative_to(tmp_path / "venv"), f"the check imports {where}, not the install"
            assert sorted(p.name for p in (where / "csrc").iterdir()) == CSRC_FILES
    assert [("pip install" in a) for _, a in runs] == [True, False], runs
