# SPDX-License-Identifier: Apache-2.0
"""The tensors alive after vLLM's real loader builds a GQSA model on the CPU (tests/vllm_cpu.py),
per layout: the model's parameters and buffers against every tensor storage the garbage collector
can reach, so a tensor the plugin or vLLM kept beyond the model's own would show as a difference.
Random weights (``--load-format dummy``) of a model shape of benchmarks/e2e.py, fp16.

    python benchmarks/results/load_memory_cpu.py OUT.json [SHAPE] [LAYERS]
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def measure(shape: str, layers: int, layout: str) -> dict:
    """One layout, in this process (VLLM_GQSA_LAYOUT must be set before the plugin loads)."""
    sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "tests")]
    import torch
    from e2e import make_model_dir
    from vllm_cpu import free_port, load_vllm_model

    quant = {"quant_method": "gqsa", "bits": 4, "group_size": 16, "sparsity": 0.5}
    model, _ = load_vllm_model(make_model_dir(tempfile.mkdtemp(), shape, quant, layers=layers),
                               port=free_port(), dtype="float16", load_format="dummy")
    gc.collect()
    own = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
           for t in [*model.parameters(), *model.buffers()]}
    alive = {}
    for o in gc.get_objects():
        if isinstance(o, torch.Tensor) and o.device.type != "meta":  # vLLM keeps meta placeholders
            alive[o.untyped_storage().data_ptr()] = o.untyped_storage().nbytes()
    return {"layout": layout, "model_MiB": sum(own.values()) / 2**20, "alive_MiB": sum(alive.values()) / 2**20,
            "bytes_beyond_the_model": sum(n for ptr, n in alive.items() if ptr not in own)}


def main() -> None:
    if os.environ.get("_LOAD_MEMORY_CHILD"):
        print(json.dumps(measure(sys.argv[1], int(sys.argv[2]), os.environ["VLLM_GQSA_LAYOUT"])))
        return
    out, shape = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "llama3-8b"
    layers = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    runs = []
    for layout in ("rows", "auto"):  # auto: the sliced layout for every G = 16 layer
        env = {**os.environ, "_LOAD_MEMORY_CHILD": "1", "VLLM_GQSA_LAYOUT": layout}
        proc = subprocess.run([sys.executable, __file__, shape, str(layers)], env=env, capture_output=True,
                              text=True, check=True)
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(runs[-1])
    Path(out).write_text(json.dumps({"command": "python " + " ".join(sys.argv), "shape": shape, "layers": layers,
                                     "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
