# SPDX-License-Identifier: Apache-2.0
"""Building vLLM models with vLLM's real model loader on a machine with no GPU.

vLLM's PyPI wheel carries no CPU kernels, so the CPU platform is selected by hand and the one
kernels a model's gated MLP needs at construction (``_C::silu_and_mul``, Gemma's
``_C::gelu_tanh_and_mul``) get plain-torch stand-ins.
Newer vLLM releases (0.33) empty the accelerator's cache after loading, which a CPU-only torch
refuses; with no accelerator there is no cache, so that call becomes a no-op. On CPUs with AMX
they also send small bf16/fp16 weights to a C++ CPU kernel the wheel lacks; those take vLLM's own
torch path instead.
Nothing GQSA-related is stubbed: config parsing, the loader, weight loading, tensor-parallel
slicing and the GQSA ops are the real ones.
"""

from __future__ import annotations

import json
import os
import socket
import traceback

import torch

_SETUP_DONE = False


def setup_cpu_vllm() -> None:
    global _SETUP_DONE
    if _SETUP_DONE:
        return
    import vllm.platforms as platforms
    from vllm.platforms.cpu import CpuPlatform

    platforms._current_platform = CpuPlatform()
    # vLLM 0.34 refuses to configure itself on an x86 CPU without Triton's CPU backend
    # (triton-cpu), which its CPU engine's kernels need. This harness runs no engine, only the
    # config, the model loader and the layers in torch, so the config check is run with that
    # requirement counted as met; every other check still runs.
    import vllm.triton_utils as triton_utils

    if not getattr(triton_utils, "HAS_TRITON", True):
        check = CpuPlatform.check_and_update_config.__func__

        def check_without_triton_cpu(cls, vllm_config):
            triton_utils.HAS_TRITON = True
            try:
                check(cls, vllm_config)
            finally:
                triton_utils.HAS_TRITON = False

        CpuPlatform.check_and_update_config = classmethod(check_without_triton_cpu)
    if not torch.accelerator.is_available():
        torch.accelerator.empty_cache = lambda: None
    # The gated activations of the supported models (Llama, Qwen, Mistral: SiLU; Gemma 3: GELU
    # with tanh), as vLLM's own torch fallbacks compute them.
    acts = {"silu_and_mul": torch.nn.functional.silu,
            "gelu_tanh_and_mul": lambda x: torch.nn.functional.gelu(x, approximate="tanh")}
    lib = None
    for name, act in acts.items():
        if hasattr(torch.ops._C, name):
            continue
        lib = lib or torch.library.Library("_C", "FRAGMENT")
        lib.define(f"{name}(Tensor! result, Tensor input) -> ()")

        def gated(out, x, act=act):
            d = x.shape[-1] // 2
            out.copy_(act(x[..., :d]) * x[..., d:])

        lib.impl(name, gated, "CPU")
    if lib is not None:
        setup_cpu_vllm.lib = lib  # keep the library alive
    # On a CPU with AMX tiles, newer vLLM (0.33) packs small bf16/fp16 weights, such as a tiny
    # model's embedding, for a kernel of its C++ CPU build (convert_weight_packed), with no switch
    # to turn that off. That build is not here, so such layers take vLLM's plain torch path, which
    # is what it does on CPUs without AMX.
    import vllm.model_executor.layers.utils as layer_utils

    if hasattr(layer_utils, "check_cpu_sgl_kernel") and not hasattr(torch.ops._C, "convert_weight_packed"):
        layer_utils.check_cpu_sgl_kernel = lambda *args, **kwargs: False
    import vllm.plugins

    vllm.plugins.load_general_plugins()  # finds vllm_gqsa through its entry point
    _SETUP_DONE = True


def load_vllm_model(ckpt: str, rank: int = 0, world_size: int = 1, port: int = 29600,
                    dtype: str = "float32", quantization: str | None = None, load_format: str = "auto",
                    pipeline_stages: int = 1):
    """The model vLLM builds from ``ckpt``, as rank ``rank`` of ``world_size``: tensor parallelism
    over ``world_size / pipeline_stages`` ranks within each of ``pipeline_stages`` stages."""
    setup_cpu_vllm()
    from vllm.config import DeviceConfig, LoadConfig, ModelConfig, ParallelConfig, VllmConfig
    from vllm.config import set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import model_parallel_is_initialized
    from vllm.model_executor.model_loader import get_model_loader

    model_config = ModelConfig(model=ckpt, dtype=dtype, enforce_eager=True, quantization=quantization)
    load_config = LoadConfig(load_format=load_format)
    config = VllmConfig(model_config=model_config, load_config=load_config,
                        device_config=DeviceConfig(device="cpu"),
                        parallel_config=ParallelConfig(tensor_parallel_size=world_size // pipeline_stages,
                                                       pipeline_parallel_size=pipeline_stages))
    with set_current_vllm_config(config):
        if not model_parallel_is_initialized():  # once per process, as in a vLLM worker
            init_distributed_environment(world_size=world_size, rank=rank, local_rank=rank,
                                         distributed_init_method=f"tcp://127.0.0.1:{port}",
                                         backend="gloo")
            initialize_model_parallel(world_size // pipeline_stages, pipeline_stages)
        model = get_model_loader(load_config).load_model(vllm_config=config, model_config=model_config)
    return model, config


def linear_layers(model) -> dict[str, torch.nn.Module]:
    from vllm.model_executor.layers.linear import LinearBase

    return {n: m for n, m in model.named_modules() if isinstance(m, LinearBase)}


def tp_worker(rank: int, world_size: int, ckpt: str, port: int, inputs: dict, out_dir: str,
              pipeline_stages: int = 1) -> None:
    """One rank: load the model and save the output of each linear layer it holds for the shared
    inputs (row-parallel layers get this rank's slice of the input)."""
    try:
        model, _ = load_vllm_model(ckpt, rank, world_size, port, pipeline_stages=pipeline_stages)
        outputs = {}
        with torch.no_grad():
            for name, layer in linear_layers(model).items():
                if name not in inputs:
                    continue
                x = inputs[name]
                k = layer.input_size_per_partition
                if k != x.shape[-1]:
                    x = x[:, layer.tp_rank * k:(layer.tp_rank + 1) * k]
                y = layer(x)
                outputs[name] = y[0] if isinstance(y, tuple) else y
            head = getattr(model, "lm_head", None)
            if "lm_head" in inputs and hasattr(head, "quant_method"):
                # A GQSA output layer (on the last pipeline stage only): this rank's vocabulary rows.
                outputs["lm_head"] = head.quant_method.apply(head, inputs["lm_head"])
        torch.save(outputs, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_tp(ckpt: str, world_size: int, tmp_path, inputs: dict, port: int | None = None,
           pipeline_stages: int = 1) -> list[dict]:
    """``tp_worker`` on ``world_size`` spawned processes (gloo); each rank's layer outputs."""
    import torch.multiprocessing as mp

    port = port or free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=tp_worker, args=(r, world_size, ckpt, port, inputs, str(tmp_path), pipeline_stages))
             for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    errors = [(tmp_path / f"rank{r}.err") for r in range(world_size)]
    errors = [e.read_text() for e in errors if e.exists()]
    if errors:
        raise RuntimeError(errors[0])
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]


def combine_column_shards(name: str, outs: list[torch.Tensor], ckpt: str) -> torch.Tensor:
    """The unsharded output of column-parallel layer ``name`` (a Llama/Qwen2 ``qkv_proj`` or
    ``gate_up_proj``) from its ranks' outputs, KV heads replicated past their count included."""
    world_size = len(outs)
    cfg = json.load(open(os.path.join(ckpt, "config.json")))
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    replicas = max(1, world_size // cfg["num_key_value_heads"])
    if name.endswith("qkv_proj"):
        sizes = [q // world_size, max(kv // world_size, head_dim), max(kv // world_size, head_dim)]
        pieces = [o.split(sizes, dim=-1) for o in outs]
        return torch.cat([torch.cat([p[0] for p in pieces], -1)]
                         + [torch.cat([pieces[r][i] for r in range(0, world_size, replicas)], -1)
                            for i in (1, 2)], -1)
    half = outs[0].shape[-1] // 2  # gate_up: [gate_r | up_r] on each rank
    return torch.cat([torch.cat([o[:, :half] for o in outs], -1),
                      torch.cat([o[:, half:] for o in outs], -1)], -1)


def check_tensor_parallel(ckpt: str, world_size: int, tmp_path, seed: int = 1):
    """Serves ``ckpt`` whole and on ``world_size`` gloo ranks, and asserts that every linear layer
    gives the same output: a row-parallel one (o_proj, down_proj; all-reduced) on every rank, a
    column-parallel one once its ranks' shards are put together. Returns the whole model."""
    full, _ = load_vllm_model(ckpt, port=free_port())
    layers = linear_layers(full)
    torch.manual_seed(seed)
    inputs = {n: torch.randn(3, l.input_size) for n, l in layers.items()}
    expected = {}
    with torch.no_grad():
        for n, l in layers.items():
            y = l(inputs[n])
            expected[n] = y[0] if isinstance(y, tuple) else y
    ranks = run_tp(ckpt, world_size, tmp_path, inputs)
    for name, exp in expected.items():
        outs = [r[name] for r in ranks]
        if name.endswith(("o_proj", "down_proj")):
            for o in outs:
                torch.testing.assert_close(o, exp, rtol=1e-4, atol=1e-4, msg=name)
        else:
            torch.testing.assert_close(combine_column_shards(name, outs, ckpt), exp, rtol=1e-4, atol=1e-4,
                                       msg=name)
    return full
