# SPDX-License-Identifier: Apache-2.0
"""Served throughput and latency at fixed request rates, with vLLM's own ``vllm bench serve``.

For each configuration of ``benchmarks/e2e.py`` (random weights of a real shape, ``--load-format
dummy``) it starts ``vllm serve`` on loopback with identical settings, runs ``vllm bench serve``
(random prompts of 128 tokens, 256 generated with ignore_eos, Poisson arrivals) at each request
rate, and stops the server. Reported per configuration and rate: request and output-token
throughput, time to first token, time per output token and end-to-end latency (median and p99),
as ``vllm bench serve`` measures them, plus the server's start-up time.

    python benchmarks/serve_bench.py --shape llama2-7b --configs gqsa-s50,gptq-marlin,fp16 \\
        --rates 2,8 --num-prompts 200 --out benchmarks/results/gpu/serve_bench_llama2-7b.json

``--dry-run`` prints the server and client commands without starting anything.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from e2e import CONFIGS, GEN_LEN, PROMPT_LEN, SHAPES, gqsa_dispatch, make_model_dir  # noqa: E402
from serve_check import stop_server, wait_ready  # noqa: E402

VLLM_CLI = [sys.executable, "-m", "vllm.entrypoints.cli.main"]
# What each result keeps from vllm bench serve's JSON.
METRICS = ("completed", "duration", "request_throughput", "output_throughput", "total_token_throughput",
           "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms", "median_itl_ms", "p99_itl_ms",
           "median_e2el_ms", "p99_e2el_ms")


def server_command(model_dir: str, port: int, engine_kwargs: dict) -> list[str]:
    """``vllm serve`` with the settings every configuration shares, plus its own engine options."""
    extra = [a for k, v in engine_kwargs.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    return [*VLLM_CLI, "serve", model_dir, "--host", "127.0.0.1", "--port", str(port),
            "--served-model-name", "bench", "--load-format", "dummy",
            "--max-model-len", str(2 * (PROMPT_LEN + GEN_LEN)), "--gpu-memory-utilization", "0.85",
            "--seed", "0", *extra]


def client_command(model_dir: str, port: int, rate: float | str, num_prompts: int, result_dir: str,
                   result_file: str) -> list[str]:
    """``vllm bench serve`` at one request rate, saving its JSON result."""
    return [*VLLM_CLI, "bench", "serve", "--backend", "vllm", "--host", "127.0.0.1", "--port", str(port),
            "--model", "bench", "--tokenizer", model_dir, "--dataset-name", "random",
            "--random-input-len", str(PROMPT_LEN), "--random-output-len", str(GEN_LEN), "--ignore-eos",
            "--request-rate", str(rate), "--num-prompts", str(num_prompts), "--seed", "0",
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
            "--save-result", "--result-dir", result_dir, "--result-filename", result_file, "--disable-tqdm"]


def run_config(name: str, shape: str, rates: list[float], num_prompts: int, port: int, log_dir: str) -> dict:
    quant, engine_kwargs = CONFIGS[name]
    model_dir = make_model_dir(tempfile.mkdtemp(), shape, quant)
    cmd = server_command(model_dir, port, engine_kwargs)
    log_path = os.path.join(log_dir, f"serve_bench_{name}.log")
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    out = {"server_command": " ".join(cmd[2:]), "rates": {}}
    try:
        wait_ready(port, proc, timeout=900)
        out["startup_seconds"] = round(time.time() - t0, 1)
        for rate in rates:
            with tempfile.TemporaryDirectory() as tmp:
                client = client_command(model_dir, port, rate, num_prompts, tmp, "result.json")
                subprocess.run(client, check=True, stdout=subprocess.DEVNULL)
                with open(os.path.join(tmp, "result.json")) as f:
                    r = json.load(f)
            out["rates"][str(rate)] = {k: r[k] for k in METRICS if k in r}
            m = out["rates"][str(rate)]
            print(f"  {rate} req/s: {m.get('output_throughput', 0):.1f} output tokens/s, "
                  f"TTFT p50 {m.get('median_ttft_ms', 0):.1f} ms, TPOT p50 {m.get('median_tpot_ms', 0):.2f} ms",
                  flush=True)
        out["client_command"] = " ".join(client_command(model_dir, port, "RATE", num_prompts, "DIR", "FILE")[2:])
    finally:
        stop_server(proc)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    p.add_argument("--configs", default="gqsa-s50,gptq-marlin,fp16")
    p.add_argument("--rates", default="2,8", help="request rates (requests per second)")
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--port", type=int, default=8331)
    p.add_argument("--out", required=True)
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    a = p.parse_args(argv)
    names = a.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"unknown configuration(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    rates = [float(r) for r in a.rates.split(",")]
    if a.dry_run:
        for name in names:
            print(" ".join(server_command("MODEL_DIR", a.port, CONFIGS[name][1])))
        for rate in rates:
            print(" ".join(client_command("MODEL_DIR", a.port, rate, a.num_prompts, "DIR", "FILE")))
        return 0
    import torch
    import vllm

    # A time-out (SIGTERM) must still stop the server, which holds most of the GPU's memory.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    results = {"shape": a.shape, "prompt_len": PROMPT_LEN, "gen_len": GEN_LEN, "num_prompts": a.num_prompts,
               "command": " ".join(sys.argv), "device": torch.cuda.get_device_name(), "vllm": vllm.__version__,
               "torch": torch.__version__, "gqsa_dispatch": gqsa_dispatch(), "configs": {}}
    log_dir = os.path.dirname(os.path.abspath(a.out))
    os.makedirs(log_dir, exist_ok=True)
    for name in names:
        print(name, flush=True)
        results["configs"][name] = run_config(name, a.shape, rates, a.num_prompts, a.port, log_dir)
        with open(a.out, "w") as f:  # after every configuration, so a time-out keeps what finished
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
