# SPDX-License-Identifier: Apache-2.0
"""benchmarks/serve_bench.py builds commands that vLLM 0.26's own `serve` and `bench serve` parsers
accept, with the options it means (the runs themselves need a GPU)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.fixture(scope="module")
def parsers():
    from vllm_cpu import setup_cpu_vllm

    setup_cpu_vllm()  # vLLM's argument defaults need a platform
    from vllm.benchmarks.serve import add_cli_args
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    serve = FlexibleArgumentParser()
    ServeSubcommand().subparser_init(serve.add_subparsers(dest="command"))
    bench = FlexibleArgumentParser()
    add_cli_args(bench)
    return serve, bench


@pytest.mark.parametrize("name,backend", [("gqsa-s50", "auto"), ("gptq-marlin", "marlin"), ("fp16", "auto")])
def test_server_command_parses(parsers, name, backend):
    import serve_bench

    cmd = serve_bench.server_command("/models/x", 8331, serve_bench.CONFIGS[name][1])
    assert cmd[:3] == serve_bench.VLLM_CLI and cmd[3] == "serve"
    ns = parsers[0].parse_args(cmd[3:])
    assert ns.model_tag == "/models/x" and ns.load_format == "dummy" and ns.port == 8331
    assert ns.linear_backend == backend


def test_client_command_parses(parsers):
    import serve_bench

    cmd = serve_bench.client_command("/models/x", 8331, 2.5, 40, "/tmp/r", "r.json")
    assert cmd[3:5] == ["bench", "serve"]
    ns = parsers[1].parse_args(cmd[5:])
    assert (ns.request_rate, ns.num_prompts, ns.dataset_name) == (2.5, 40, "random")
    assert (ns.random_input_len, ns.random_output_len) == (serve_bench.PROMPT_LEN, serve_bench.GEN_LEN)
    assert ns.ignore_eos and ns.save_result and ns.result_filename == "r.json"


def test_unknown_config_is_refused(capsys):
    import serve_bench

    with pytest.raises(SystemExit):
        serve_bench.main(["--configs", "gqsa-s50,w9", "--out", "/tmp/x.json", "--dry-run"])
    assert "unknown configuration(s) w9" in capsys.readouterr().err


def test_e2e_quantization_configs_parse(parsers):
    """Every benchmarks/e2e.py configuration's quantization_config is one vLLM reads as meant."""
    import e2e
    from vllm.model_executor.layers.quantization import get_quantization_config

    import vllm_gqsa  # noqa: F401  (registers gqsa, sparse24 and gptq_w2)
    from vllm_gqsa.gptq_w2 import GPTQW2Config

    for name, (quant, _) in e2e.CONFIGS.items():
        if quant is None:
            continue
        # A 2-bit GPTQ config is claimed by gptq_w2's override before vLLM's own GPTQ sees it.
        method = GPTQW2Config.override_quantization_method(quant, None) or quant["quant_method"]
        assert (method == "gptq_w2") == (name == "gptq-w2"), name
        cfg = get_quantization_config(method).from_config(quant)
        if name == "gptq-w2":
            assert cfg.group_size == 128
        elif name == "awq":
            assert (cfg.weight_bits, cfg.group_size, cfg.zero_point) == (4, 128, True)
            assert cfg.modules_to_not_convert == []  # every linear layer quantized
        elif name.startswith("gptq"):
            assert (cfg.weight_bits, cfg.group_size, cfg.desc_act) == (4, 128, False)
        elif name.startswith("gqsa"):
            q = cfg.quant
            assert (q.bits, q.group_size) == (4, 32 if name.endswith("-g32") else 16), name
            rows = re.search(r"-r(\d+)$", name)
            assert q.block_rows == (int(rows.group(1)) if rows else 1), name


def test_e2e_config_environments(monkeypatch):
    """benchmarks/e2e.py runs some configurations with plugin settings in their environment: each
    names a configuration and sets what the plugin reads (gqsa-s50-rows: the row layout)."""
    import e2e

    from vllm_gqsa.kernels import cuda

    assert set(e2e.CONFIG_ENV) <= set(e2e.CONFIGS)
    for same in ("gqsa-s50-rows", "gqsa-s50-unfused"):  # the checkpoint, served otherwise
        assert e2e.CONFIGS[same] == e2e.CONFIGS["gqsa-s50"]
    assert e2e.CONFIGS["gqsa-s50-pairs-switch64"] == e2e.CONFIGS["gqsa-s50-pairs"]
    for name, env in e2e.CONFIG_ENV.items():
        for k, v in env.items():
            monkeypatch.setenv(k, v)
    assert cuda.kernel_layout() == "rows"
    # The fused kernel's switch is read when the plugin's kernels module is imported.
    read = "from vllm_gqsa.kernels import cuda; print(cuda.PAIRS_WGMMA_MIN_TOKENS)"
    env = {**os.environ, **e2e.CONFIG_ENV["gqsa-s50-pairs-switch64"]}
    out = subprocess.run([sys.executable, "-c", read], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == "64" != str(cuda.PAIRS_WGMMA_MIN_TOKENS)


def test_e2e_combine_starts():
    """benchmarks/e2e.py --starts: medians over the engine starts that ran, every start kept."""
    import e2e

    def start(tps1, tps16, ttft, weights=2.9):
        return {"startup_seconds": 60.0, "batch1": {"seconds": 1.0, "output_tokens_per_s": tps1},
                "batch16": {"seconds": 1.0, "output_tokens_per_s": tps16},
                "ttft": {"2048": {"ttft_ms": ttft}}, "weights_gib": weights}

    one = start(400.0, 3000.0, 50.0)
    assert e2e.combine_starts([one]) is one  # one start: the file reads as before
    starts = [start(400.0, 3000.0, 50.0), start(440.0, 3100.0, 52.0), {"error": "exit code 1", "weights_gib": None},
              start(420.0, 2900.0, 49.0)]
    c = e2e.combine_starts(starts)
    assert c["starts"] == starts and c["failed_starts"] == 1
    assert c["batch1"] == {"output_tokens_per_s": 420.0, "starts_tokens_per_s": [400.0, 440.0, 420.0]}
    assert c["batch16"]["output_tokens_per_s"] == 3000.0
    assert c["ttft"]["2048"]["ttft_ms"] == 50.0
    assert c["weights_gib"] == 2.9 and "error" not in c
    assert e2e.combine_starts(starts[2:3] * 2)["error"] == "every start failed"


def test_e2e_marlin_ratios_cut_short():
    """benchmarks/e2e.py: ratios to Marlin are written after every start, so a run cut short
    during a round keeps the ratios of the rounds that ran both starts."""
    import e2e

    def starts(*tps):
        return e2e.combine_starts([{"batch1": {"output_tokens_per_s": t}} for t in tps])

    configs = {"gptq-marlin": starts(300.0, 280.0, 290.0), "gqsa-s50": starts(420.0, 406.0)}
    e2e.add_marlin_ratios(configs, [1, 16])
    assert configs["gqsa-s50"]["batch1"]["vs_gptq_marlin"] == round(413.0 / 290.0, 3)
    assert configs["gqsa-s50"]["batch1"]["vs_gptq_marlin_starts"] == [1.4, 1.45]
    assert configs["gptq-marlin"]["batch1"]["vs_gptq_marlin"] == 1.0
    assert "batch16" not in configs["gqsa-s50"]
    # After a failed start the lists no longer pair rounds: no per-round ratios.
    configs["gqsa-s50"] = e2e.combine_starts([{"batch1": {"output_tokens_per_s": 420.0}}, {"error": "exit code 1"}])
    e2e.add_marlin_ratios(configs, [1])
    assert "vs_gptq_marlin_starts" not in configs["gqsa-s50"]["batch1"]
    # One start each: the plain ratio only.
    one = {"gptq-marlin": {"batch1": {"output_tokens_per_s": 300.0}},
           "gqsa-s50": {"batch1": {"output_tokens_per_s": 405.0}}}
    e2e.add_marlin_ratios(one, [1])
    assert one["gqsa-s50"]["batch1"] == {"output_tokens_per_s": 405.0, "vs_gptq_marlin": 1.35}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_e2e_model_dtype(tmp_path, dtype):
    """benchmarks/e2e.py --dtype: the model folder it makes is read in that dtype."""
    import e2e
    import torch
    from transformers import AutoConfig

    d = e2e.make_model_dir(str(tmp_path), "llama3-8b", e2e.CONFIGS["gqsa-s50"][0], dtype)
    cfg = AutoConfig.from_pretrained(d)
    assert cfg.dtype == getattr(torch, dtype)
    assert cfg.quantization_config["quant_method"] == "gqsa"
    assert cfg.num_hidden_layers == 32


def test_e2e_gemma3_shape(tmp_path):
    """benchmarks/e2e.py --shape gemma3-12b: a Gemma 3 folder with its sliding and full attention
    layers in that pattern (also when --layers cuts it short), refused in fp16 as vLLM would."""
    import e2e
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(e2e.make_model_dir(str(tmp_path / "a"), "gemma3-12b",
                                                        e2e.CONFIGS["gptq-marlin"][0], "bfloat16"))
    assert cfg.architectures == ["Gemma3ForCausalLM"] and cfg.model_type == "gemma3_text"
    assert (cfg.num_hidden_layers, cfg.head_dim, cfg.sliding_window, cfg.tie_word_embeddings) == (48, 256, 1024, True)
    assert cfg.layer_types.count("full_attention") == 8 and cfg.layer_types[5] == "full_attention"
    assert cfg.quantization_config["quant_method"] == "gptq"
    cfg = AutoConfig.from_pretrained(e2e.make_model_dir(str(tmp_path / "b"), "gemma3-12b", None, "bfloat16", 6))
    assert len(cfg.layer_types) == 6
    # With a quantized output layer the model is untied from its embedding.
    for i, name in enumerate(("gqsa-s50-head", "gptq-marlin-head")):
        cfg = AutoConfig.from_pretrained(e2e.make_model_dir(str(tmp_path / f"h{i}"), "gemma3-12b",
                                                            e2e.CONFIGS[name][0], "bfloat16", 6))
        assert cfg.tie_word_embeddings is False
    with pytest.raises(SystemExit):
        e2e.main(["--shape", "gemma3-12b", "--out", str(tmp_path / "x.json")])


def test_e2e_layers(tmp_path):
    """benchmarks/e2e.py --layers: the shape's layers, fewer of them (the engine-overhead probe)."""
    import e2e
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(e2e.make_model_dir(str(tmp_path), "llama2-7b", None, layers=1))
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (1, 4096, 11008)


@pytest.mark.parametrize("name, category", [
    ("void gqsa::(anonymous namespace)::gemv_kernel<__half, 16, 1, true>(const __half*, ...)", "gqsa linear"),
    ("void gqsa::(anonymous namespace)::tc_kernel<__half, 16, 2, false, false>(...)", "gqsa linear"),
    ("void marlin::Marlin<(vllm::ScalarType::Id)5, 256, 1, 8, 8, false, 4, 8, false>(...)", "marlin linear"),
    ("void gemm_half_q_half_gptq_2bit_kernel<true, 1>(...)", "other quantized linear"),
    ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", "rmsnorm and residual"),
    ("triton_red_fused_fused_add_rms_norm_gqsa_mm_0", "rmsnorm and residual"),
    ("triton_red_fused_fused_add_rms_norm_marlin_gemm_2", "rmsnorm and residual"),
    ("triton_poi_fused_gqsa_mm_mul_silu_slice_1", "activation"),
    ("triton_poi_fused_add_cat_index_select_mul_split_split_with_sizes_sub_unsqueeze_view_3", "rotary embedding"),
    ("triton_poi_fused_mul_silu_slice_1", "activation"),
    ("void vllm::act_and_mul_kernel<c10::Half, ...>(...)", "activation"),
    ("void flash::flash_fwd_splitkv_kernel<Flash_fwd_kernel_traits<128, 64, 128, 4>, ...>(...)", "attention"),
    ("void vllm::reshape_and_cache_flash_kernel<__half, __half, 0>(...)", "attention"),
    ("void cutlass::device_kernel<flash::enable_sm90_or_later<flash::FlashAttnFwdSm90<...> > >(...)", "attention"),
    ("void cutlass::device_kernel<flash::FlashAttnFwdCombine<cute::tuple<cute::C<8>, ...> > >(...)", "attention"),
    ("void vllm::rotary_embedding_kernel<c10::Half, true>(...)", "rotary embedding"),
    ("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1", "dense gemm (lm_head)"),
    ("nvjet_hsh_64x8_64x16_2x1_v_bz_splitK_TNT", "dense gemm (lm_head)"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::ArgMaxOps<float>, ...>(...)",
     "sampling"),
    ("Memcpy DtoH (Device -> Pinned)", "other"),
])
def test_e2e_kernel_categories(name, category):
    """benchmarks/e2e.py --profile-batches sorts a decode step's kernels by what they do: the linear
    layers' kernels of each method apart from the rest of the step."""
    import e2e

    assert e2e.kernel_category(name) == category


def test_serve_check_greedy_and_scored_agree_with_transformers(tiny_models):
    """benchmarks/serve_check.py: the greedy reference the serving checks and the vLLM GPU tests
    compare against is transformers' own greedy generation, and scoring its tokens back gives the
    logprobs it chose them with."""
    import serve_check
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    prompt = [5, 17, 200, 33, 90, 7]
    tokens, logprobs = serve_check.greedy(model, prompt, 8)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert tokens == out[0, len(prompt):].tolist()
    assert serve_check.scored(model, prompt, tokens) == pytest.approx(logprobs, abs=1e-4)
