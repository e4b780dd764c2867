# SPDX-License-Identifier: Apache-2.0
"""End-to-end speed in vLLM: fp16 against GPTQ (Marlin, Machete), AWQ, 2:4, 2-bit GPTQ and GQSA.

Random weights of a real model shape (``--load-format dummy``): values do not change speed. Each
configuration runs in its own process with identical engine settings and reports output tokens
per second for prompt 128 / 256 generated tokens (ignore_eos) at each batch size, the time to
first token of one request at each ``--ttft-prompts`` length (a 1-token generation, best of 3),
and the GPU memory vLLM reports for the weights ("Model loading took ... GiB"). ``--dtype bfloat16``
makes and serves the model in bf16 (the ``fp16`` configuration is then the dense bf16 model).
``--profile-batches 1,16`` also says where a decode step's GPU time goes at those batch sizes (the
linear layers, attention, norms, the output layer, ...; see profile_decode). ``--layers 1`` keeps
one decoder layer of the shape: a step's GPU work is then small, and its wall time is mostly the
engine's own work per step, the floor under every configuration's step at small batches.
``--starts 3`` starts each configuration's engine three times, interleaved (the configurations in
order, then in reverse, ...): one start's tokens/s can move by 5% from the next, more than some of
the differences measured here, so each batch's tokens/s (and each time to first token) is then the
median over the starts, with every start's own numbers kept and, against Marlin, the ratio of each
round's pair of starts. ``gqsa-s50-rows`` is ``gqsa-s50`` served in the row layout
(``VLLM_GQSA_LAYOUT=rows``) instead of the sliced one, for an A/B of the two layouts in one run,
``gqsa-s50-unfused`` with each RMSNorm left a kernel of its own (``VLLM_GQSA_SPLIT_NORM=0``), and
``gqsa-s50-pairs-switch64`` the pair pattern with its fused kernel only from 64 tokens
(``VLLM_GQSA_PAIRS_WGMMA_MIN_TOKENS=64``; the default is 33), for batches of 33 to 63, and
``gqsa-s50-pairs-act`` the pair pattern with SiLU-and-mul a kernel of its own
(``VLLM_GQSA_FUSE_SILU_MUL=0``) instead of done by the gate/up layer's kernel, and
``gqsa-s50-pairs-split`` the pair pattern with each RMSNorm split between the layers around it at 2
to 32 tokens (``VLLM_GQSA_SPLIT_NORM_PAIRS=1``) instead of a kernel of its own.

    python benchmarks/e2e.py --shape llama2-7b --batches 1,4,16,64,128 --ttft-prompts 512,2048,8192 \
        --configs fp16,gptq-marlin,gptq-machete,awq,sparse24,gptq-w2,gqsa-s50 --out benchmarks/results/e2e.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vllm_gqsa.format import DEFAULT_TARGET_MODULES  # noqa: E402

SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    # Five sliding-window layers (1024 tokens) to one full-attention layer, heads of 256, and a
    # 262,144-token output layer tied to the embedding (1.9 GiB in bf16, read every step at any
    # quantization of the linear layers). vLLM serves Gemma 3 in bf16 only.
    "gemma3-12b": dict(hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=256, vocab_size=262144,
                       sliding_window=1024, query_pre_attn_scalar=256),
}
# Shapes of another architecture than Llama, and the transformers config class that writes them
# (it fills in that release's layout of the fields, e.g. Gemma 3's per-layer attention types).
ARCHITECTURES = {"gemma3-12b": ("Gemma3TextConfig", "Gemma3ForCausalLM")}
# With dummy weights there is no safetensors header for vLLM to read the quantized layers from,
# so GPTQ must name them, or it silently serves every layer in fp16.
GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True,
        "checkpoint_format": "gptq",
        "modules_in_block_to_quantize": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                                         ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"],
                                         ["mlp.down_proj"]]}
CONFIGS = {
    "fp16": (None, {}),
    "gptq-marlin": (GPTQ, {"linear_backend": "marlin"}),
    "gptq-machete": (GPTQ, {"linear_backend": "machete"}),
    # AWQ W4 g128 with zero points, as AutoAWQ writes it; vLLM serves it with its Marlin kernel on
    # CUDA (AutoAWQConfig: AutoAWQMarlinLinearMethod). Every linear layer is quantized by default.
    "awq": ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}, {}),
    # W2: 2-bit GPTQ g128, which vLLM's own GPTQ method refuses; vllm_gqsa/gptq_w2.py takes it and
    # serves it through vLLM's ExLlama kernel.
    "gptq-w2": ({"quant_method": "gptq", "bits": 2, "group_size": 128, "desc_act": False, "sym": True,
                 "checkpoint_format": "gptq"}, {}),
    # fp16 2:4 (vllm_gqsa/sparse24.py: CUTLASS on Ampere, cuSPARSELt elsewhere, or as
    # VLLM_GQSA_SPARSE24_BACKEND says): random dense weights pruned at load.
    "sparse24": ({"quant_method": "sparse24"}, {}),
    "gqsa-s50": ({"quant_method": "gqsa", "bits": 4, "group_size": 16, "sparsity": 0.5}, {}),
    "gqsa-s40": ({"quant_method": "gqsa", "bits": 4, "group_size": 16, "sparsity": 0.4}, {}),
    "gqsa-s30": ({"quant_method": "gqsa", "bits": 4, "group_size": 16, "sparsity": 0.3}, {}),
    # Groups of 32: half the metadata per weight (2.5 instead of 3 bits per weight at S50%).
    "gqsa-s50-g32": ({"quant_method": "gqsa", "bits": 4, "group_size": 32, "sparsity": 0.5}, {}),
    # Row blocks of 16 and 64 rows sharing their pruning pattern (--block-rows), served by the same
    # kernels after the load-time repacking into single rows.
    # The output layer converted too (gqsa-convert --quantize-output-layer; dummy weights fill it
    # unpruned, that option's default), against GPTQ with its output layer quantized (GPTQ's
    # "lm_head": true, vLLM's lm_head_quantized, served by the same Marlin kernel).
    "gqsa-s50-head": ({"quant_method": "gqsa", "bits": 4, "group_size": 16, "sparsity": 0.5,
                       "target_modules": [*DEFAULT_TARGET_MODULES, "lm_head"]}, {}),
    "gptq-marlin-head": ({**GPTQ, "lm_head": True,
                          "modules_in_block_to_quantize": [*GPTQ["modules_in_block_to_quantize"], ["lm_head"]]},
                         {"linear_backend": "marlin"}),
    # The pair pattern (gqsa-convert --pattern pairs: one group of each aligned pair kept per row),
    # served by the sparse-tensor-core kernel from 2 tokens (on Hopper by the fused kernel from 33).
    "gqsa-s50-pairs": ({"quant_method": "gqsa", "bits": 4, "group_size": 16, "sparsity": 0.5, "pattern": "pairs"}, {}),
    # The same with the fused kernel only from 64 tokens (VLLM_GQSA_PAIRS_WGMMA_MIN_TOKENS=64, the
    # switch before its copy of x was padded to whole token tiles), for an A/B at 33 to 63 tokens.
    "gqsa-s50-pairs-switch64": ({"quant_method": "gqsa", "bits": 4, "group_size": 16, "sparsity": 0.5,
                                 "pattern": "pairs"}, {}),
    # The same with SiLU-and-mul a kernel of its own (VLLM_GQSA_FUSE_SILU_MUL=0), for an A/B.
    "gqsa-s50-pairs-act": ({"quant_method": "gqsa", "bits": 4, "group_size": 16, "sparsity": 0.5, "pattern": "pairs"}, {}),
    # The same with each RMSNorm split between the layers around it (VLLM_GQSA_SPLIT_NORM_PAIRS=1).
    "gqsa-s50-pairs-split": ({"quant_method": "gqsa", "bits": 4, "group_size": 16, "sparsity": 0.5,
                              "pattern": "pairs"}, {}),
    "gqsa-s50-r16": ({"quant_method": "gqsa", "bits": 4, "group_size": 16, "sparsity": 0.5, "block_rows": 16}, {}),
    "gqsa-s50-r64": ({"quant_method": "gqsa", "bits": 4, "group_size": 16, "sparsity": 0.5, "block_rows": 64}, {}),
    # The default checkpoint in the row layout instead of the sliced one (VLLM_GQSA_LAYOUT=rows,
    # CONFIG_ENV below), for an A/B of the two layouts in one run.
    "gqsa-s50-rows": ({"quant_method": "gqsa", "bits": 4, "group_size": 16, "sparsity": 0.5}, {}),
    # The default checkpoint with each RMSNorm a kernel of its own (VLLM_GQSA_SPLIT_NORM=0) instead of
    # split between the GQSA layers around it (vllm_gqsa/fusion.py), for an A/B.
    "gqsa-s50-unfused": ({"quant_method": "gqsa", "bits": 4, "group_size": 16, "sparsity": 0.5}, {}),
}
# Environment variables a configuration's process runs with (read by the plugin at load time).
CONFIG_ENV = {"gqsa-s50-rows": {"VLLM_GQSA_LAYOUT": "rows"}, "gqsa-s50-unfused": {"VLLM_GQSA_SPLIT_NORM": "0"},
              "gqsa-s50-pairs-switch64": {"VLLM_GQSA_PAIRS_WGMMA_MIN_TOKENS": "64"},
              "gqsa-s50-pairs-act": {"VLLM_GQSA_FUSE_SILU_MUL": "0"},
              "gqsa-s50-pairs-split": {"VLLM_GQSA_SPLIT_NORM_PAIRS": "1"}}
PROMPT_LEN, GEN_LEN = 128, 256
# --profile-batches: decode steps in the profiled generation (after its prefill).
PROFILE_STEPS = 64

# Where a decode step's GPU time goes: kernel-name fragments (lower case) per category, first match
# wins. vLLM's torch.compile turns RMSNorm with the residual add, SiLU-and-mul and the rotary
# embedding into generated Triton kernels named after the ops they fuse, which include the linear
# op they feed (triton_red_fused_fused_add_rms_norm_gqsa_mm_0), so those never count as a linear
# layer; the rotary embedding's is named after its cache lookup (index_select).
# FlashAttention 3 is a CUTLASS kernel, so attention is tried before the dense GEMM's fragments.
LINEAR_CATEGORIES = (
    ("gqsa linear", ("gqsa",)),
    ("marlin linear", ("marlin",)),
    ("machete linear", ("machete",)),
    ("other quantized linear", ("exllama", "gptq", "awq", "cusparselt", "sparse")),
)
ATTENTION = ("attention", ("flash", "attn", "attention", "paged", "reshape_and_cache", "fmha"))
DENSE_GEMM = ("dense gemm (lm_head)", ("gemm", "cutlass", "xmma", "cublas", "nvjet", "sm90_", "sm80_"))
OTHER_CATEGORIES = (
    ("rmsnorm and residual", ("rms", "norm", "rsqrt")),
    ("activation", ("act_and_mul", "silu", "sigmoid")),
    ("rotary embedding", ("rotary", "rope", "index_select")),
    ("sampling", ("sample", "argmax", "topk", "top_k")),
)


def kernel_category(name: str) -> str:
    low = name.lower()
    generated = low.startswith("triton_")
    for category, fragments in OTHER_CATEGORIES if generated else (*LINEAR_CATEGORIES, ATTENTION, DENSE_GEMM,
                                                                    *OTHER_CATEGORIES):
        if any(f in low for f in fragments):
            return category
    return "other"


def profile_decode(llm, batch: int, prompt_ids: list) -> dict:
    """Where a decode step's time goes at `batch`: GPU kernel time by category (kernel_category)
    from torch.profiler (the engine must run in this process), and the wall time per step. Each
    is the difference between generating 1 + PROFILE_STEPS tokens and generating one, divided by
    PROFILE_STEPS, so the prefill cancels out. The wall times come from runs without the
    profiler, before the profiled ones (best of three); they include the GPU's idle gaps."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids[:batch]]

    def generate(tokens: int) -> float:
        params = SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=0.0)
        t = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    def kernels(tokens: int) -> dict:
        generate(tokens)  # warm-up, and the same prefix-cache state as the profiled run
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            generate(tokens)
        out = {}
        for e in prof.key_averages():
            if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0:
                us, n = out.get(e.key, (0.0, 0))
                out[e.key] = (us + e.self_device_time_total, n + e.count)
        return out

    steps = PROFILE_STEPS
    # Wall times first: once torch.profiler has run, its CUDA tracing state can stay in the process.
    walls = {tokens: min(generate(tokens) for _ in range(3)) for tokens in (1, 1 + steps)}
    k1, k2 = kernels(1), kernels(1 + steps)
    per_step = {}
    for name, (us, n) in k2.items():
        us1, n1 = k1.get(name, (0.0, 0))
        per_step[name] = ((us - us1) / steps, (n - n1) / steps)
    by_category = {}
    for name, (us, _) in per_step.items():
        category = kernel_category(name)
        by_category[category] = by_category.get(category, 0.0) + us
    kernel_us = sum(by_category.values())
    wall_us = 1e6 * (walls[1 + steps] - walls[1]) / steps
    return {"batch": batch, "steps": steps, "wall_s_1_token": round(walls[1], 4),
            f"wall_s_{1 + steps}_tokens": round(walls[1 + steps], 4), "wall_us_per_step": round(wall_us, 1),
            "kernel_us_per_step": round(kernel_us, 1), "gpu_idle_us_per_step": round(wall_us - kernel_us, 1),
            "by_category_us_per_step": {k: round(v, 1) for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])},
            "top_kernels": [{"name": n[:160], "category": kernel_category(n), "us_per_step": round(us, 2),
                             "calls_per_step": round(c, 2)}
                            for n, (us, c) in sorted(per_step.items(), key=lambda kv: -kv[1][0])[:20]]}


def make_model_dir(root: str, shape: str, quant: dict | None, dtype: str = "float16",
                   layers: int | None = None) -> str:
    from converters.tiny import byte_tokenizer

    os.makedirs(root, exist_ok=True)
    dims = {**SHAPES[shape], **({"num_hidden_layers": layers} if layers else {})}
    if shape in ARCHITECTURES:
        import transformers

        config_cls, arch = ARCHITECTURES[shape]
        cfg = getattr(transformers, config_cls)(max_position_embeddings=16384, bos_token_id=1, eos_token_id=2,
                                                pad_token_id=0, **dims).to_dict()
        cfg.update(architectures=[arch], dtype=dtype)
    else:
        cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "dtype": dtype,
               "max_position_embeddings": 16384, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
               "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
               **dims}
    if quant:
        cfg["quantization_config"] = quant
        if quant.get("lm_head") or "lm_head" in quant.get("target_modules", ()):
            # A quantized output layer is stored apart from the (dense) embedding, as
            # gqsa-convert --quantize-output-layer writes it; Gemma 3 ties them otherwise.
            cfg["tie_word_embeddings"] = False
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump(cfg, f)
    byte_tokenizer().save_pretrained(root)
    return root


def run_one(model_dir: str, engine_kwargs: dict, batches: list[int], ttft_prompts: list[int],
            profile_batches: tuple = ()) -> dict:
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.time()
    max_len = max([PROMPT_LEN + GEN_LEN, *(n + 1 for n in ttft_prompts)])
    # CUDA graphs are captured for the measured batch sizes only: the same graphs serve them as with
    # vLLM's default 35 sizes, and the 2:4 engine spends about a minute capturing each size.
    llm = LLM(model=model_dir, load_format="dummy", max_model_len=max_len, gpu_memory_utilization=0.85,
              max_num_seqs=max(batches), seed=0,
              compilation_config={"cudagraph_capture_sizes": sorted(set(batches))}, **engine_kwargs)
    startup = time.time() - t0
    params = SamplingParams(max_tokens=GEN_LEN, ignore_eos=True, temperature=0.0)
    g = torch.Generator().manual_seed(0)
    out = {"startup_seconds": round(startup, 1)}
    for b in batches:
        prompts = [TokensPrompt(prompt_token_ids=torch.randint(100, 30000, (PROMPT_LEN,), generator=g).tolist())
                   for _ in range(b)]
        llm.generate(prompts, params, use_tqdm=False)  # warm-up
        times = []
        for _ in range(2):
            t = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            times.append(time.perf_counter() - t)
        best = min(times)
        out[f"batch{b}"] = {"seconds": round(best, 3), "output_tokens_per_s": round(b * GEN_LEN / best, 1)}
        print(f"  batch {b}: {b * GEN_LEN / best:.1f} output tokens/s", flush=True)
    first = SamplingParams(max_tokens=1, ignore_eos=True, temperature=0.0)
    for n in ttft_prompts:
        prompt = [TokensPrompt(prompt_token_ids=torch.randint(100, 30000, (n,), generator=g).tolist())]
        llm.generate(prompt, first, use_tqdm=False)  # warm-up (and the prefix cache is per prompt)
        times = []
        for _ in range(3):
            prompt = [TokensPrompt(prompt_token_ids=torch.randint(100, 30000, (n,), generator=g).tolist())]
            t = time.perf_counter()
            llm.generate(prompt, first, use_tqdm=False)
            times.append(time.perf_counter() - t)
        out.setdefault("ttft", {})[str(n)] = {"ttft_ms": round(1e3 * min(times), 2)}
        print(f"  time to first token, {n}-token prompt: {1e3 * min(times):.1f} ms", flush=True)
    for b in profile_batches:
        ids = [torch.randint(100, 30000, (PROMPT_LEN,), generator=g).tolist() for _ in range(b)]
        out.setdefault("decode_profile", {})[f"batch{b}"] = prof = profile_decode(llm, b, ids)
        print(f"  decode step at batch {b}: {prof['wall_us_per_step']:.0f} us wall, "
              f"{prof['kernel_us_per_step']:.0f} us of kernels: {prof['by_category_us_per_step']}", flush=True)
    return out


def combine_starts(starts: list[dict]) -> dict:
    """One configuration's results over its engine starts (``--starts``). A single start is
    returned as it is. Otherwise each batch's ``output_tokens_per_s`` and each prompt length's
    ``ttft_ms`` is the median over the starts that ran, beside the list it is taken from; the
    starts' own results are kept under ``starts``, and ``failed_starts`` counts those that failed."""
    if len(starts) == 1:
        return starts[0]
    ran = [s for s in starts if "error" not in s]
    out: dict = {"starts": starts, "failed_starts": len(starts) - len(ran)}
    if not ran:
        out["error"] = "every start failed"
        return out
    for key in sorted({k for s in ran for k in s if k.startswith("batch")}):
        values = [s[key]["output_tokens_per_s"] for s in ran if key in s]
        out[key] = {"output_tokens_per_s": round(statistics.median(values), 1), "starts_tokens_per_s": values}
    for n in sorted({n for s in ran for n in s.get("ttft", {})}, key=int):
        values = [s["ttft"][n]["ttft_ms"] for s in ran if n in s.get("ttft", {})]
        out.setdefault("ttft", {})[n] = {"ttft_ms": round(statistics.median(values), 2), "starts_ttft_ms": values}
    weights = sorted({s.get("weights_gib") for s in ran}, key=str)
    out["weights_gib"] = weights[0] if len(weights) == 1 else weights
    return out


def add_marlin_ratios(configs: dict, batches: list[int]) -> None:
    """Each configuration's tokens/s against ``gptq-marlin``'s at each batch (``vs_gptq_marlin``),
    and with ``--starts``, against Marlin's start of the same round (``vs_gptq_marlin_starts``):
    the two starts of a round ran close together. Rounds that have not run both yet (a run cut
    short) are left out."""
    base = configs.get("gptq-marlin", {})
    for r in configs.values():
        for key in (f"batch{b}" for b in batches):
            if key not in r or key not in base:
                continue
            r[key]["vs_gptq_marlin"] = round(r[key]["output_tokens_per_s"] / base[key]["output_tokens_per_s"], 3)
            mine, marlin = r[key].get("starts_tokens_per_s"), base[key].get("starts_tokens_per_s")
            # The i-th value of each list is the i-th round's start only while none has failed.
            if mine and marlin and r.get("failed_starts") == base.get("failed_starts") == 0:
                r[key]["vs_gptq_marlin_starts"] = [round(x / y, 3) for x, y in zip(mine, marlin)]


def weight_memory_gib(log: str) -> float | None:
    """The weights' GPU memory from vLLM's "Model loading took X GiB" log line."""
    m = re.search(r"Model loading took ([0-9.]+) GiB", log)
    return float(m.group(1)) if m else None


def gqsa_dispatch() -> dict:
    """The GQSA kernels' token-count crossovers the engines will use (env overrides included)."""
    from vllm_gqsa.kernels import cuda

    return {"gemv_max_tokens": cuda.GEMV_MAX_TOKENS, "tc_max_tokens": cuda.TC_MAX_TOKENS,
            "compact_gemv_max_tokens": cuda.COMPACT_GEMV_MAX_TOKENS,
            "compact_tc_max_tokens": cuda.COMPACT_TC_MAX_TOKENS,
            "pairs_gemv_max_tokens": cuda.PAIRS_GEMV_MAX_TOKENS, "pairs_sp_max_tokens": cuda.PAIRS_SP_MAX_TOKENS,
            "pairs_wgmma": cuda.PAIRS_WGMMA, "pairs_wgmma_min_tokens": cuda.PAIRS_WGMMA_MIN_TOKENS}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    p.add_argument("--configs", default="fp16,gptq-marlin,gqsa-s50")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--ttft-prompts", default="", help="prompt lengths for time to first token, e.g. 512,2048,8192")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"],
                   help="the model's dtype, which vLLM serves it in (the W2 kernel takes float16 only)")
    p.add_argument("--profile-batches", default="",
                   help="also profile decode steps at these batch sizes, e.g. 1,16 (GPU time per step by "
                        "kernel category, and the wall time); the engine then runs in the benchmark's "
                        "process (VLLM_ENABLE_V1_MULTIPROCESSING=0), which the tokens/s also measure")
    p.add_argument("--layers", type=int, default=None,
                   help="decoder layers instead of the shape's own: with 1, a decode step's GPU work is "
                        "small, so its wall time is about what the engine spends on each step around it")
    p.add_argument("--starts", type=int, default=1,
                   help="engine starts per configuration, interleaved; with more than one, the medians "
                        "(see the module's documentation)")
    p.add_argument("--out", required=True)
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.shape.startswith("gemma") and a.dtype != "bfloat16":
        p.error(f"vLLM serves {a.shape} in bfloat16 only: pass --dtype bfloat16")
    if a.starts < 1:
        p.error("--starts must be at least 1")
    batches = [int(b) for b in a.batches.split(",")]
    ttft_prompts = [int(n) for n in a.ttft_prompts.split(",") if n]
    profile_batches = tuple(int(b) for b in a.profile_batches.split(",") if b)
    if a.child:  # one configuration in this process
        quant, engine_kwargs = CONFIGS[a.child]
        d = make_model_dir(tempfile.mkdtemp(), a.shape, quant, a.dtype, a.layers)
        with open(a.out, "w") as f:
            json.dump(run_one(d, engine_kwargs, batches, ttft_prompts, profile_batches), f)
        return 0
    import torch
    import vllm

    results = {"shape": a.shape, "layers": a.layers or SHAPES[a.shape]["num_hidden_layers"], "dtype": a.dtype, "prompt_len": PROMPT_LEN, "gen_len": GEN_LEN, "command": " ".join(sys.argv),
               "engine_in_process": bool(profile_batches), "starts": a.starts,
               "device": torch.cuda.get_device_name(), "vllm": vllm.__version__, "torch": torch.__version__,
               "gqsa_dispatch": gqsa_dispatch(),
               "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("VLLM_GQSA_")},
               "configs": {}}
    names = a.configs.split(",")
    runs = [(r, name) for r in range(a.starts) for name in (names if r % 2 == 0 else names[::-1])]
    per_start: dict[str, list] = {name: [] for name in names}
    for r, name in runs:
        print(name if a.starts == 1 else f"{name} (start {r + 1} of {a.starts})", flush=True)
        tmp = tempfile.mktemp(suffix=".json")
        env = {**os.environ, **CONFIG_ENV.get(name, {}),
               **({"VLLM_ENABLE_V1_MULTIPROCESSING": "0"} if profile_batches else {})}
        proc = subprocess.Popen([sys.executable, __file__, "--shape", a.shape, "--batches", a.batches,
                                 "--ttft-prompts", a.ttft_prompts, "--dtype", a.dtype, "--out", tmp, "--child", name,
                                 "--profile-batches", a.profile_batches,
                                 *(["--layers", str(a.layers)] if a.layers else [])],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        log = []
        for line in proc.stdout:  # shown as it comes, kept for the weight-memory line
            print(line, end="", flush=True)
            log.append(line)
        rc = proc.wait()
        one = json.load(open(tmp)) if rc == 0 else {"error": f"exit code {rc}"}
        one["weights_gib"] = weight_memory_gib("".join(log))
        per_start[name].append(one)
        results["configs"][name] = combine_starts(per_start[name])
        if name in CONFIG_ENV:
            results["configs"][name]["env"] = CONFIG_ENV[name]
        add_marlin_ratios(results["configs"], batches)
        with open(a.out, "w") as f:  # after every configuration, so a cut-short run keeps its results
            json.dump(results, f, indent=2)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
