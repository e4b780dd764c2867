# SPDX-License-Identifier: Apache-2.0
"""Serve a GQSA checkpoint with ``vllm serve`` and check it against transformers.

For each serving mode (CUDA graphs + torch.compile, and ``--enforce-eager``) it starts
``vllm serve CKPT`` on loopback, sends greedy completions (32 tokens, the chosen token's
logprob) for 10 prompts, one at a time (decode at batch 1: the GEMV) and then all in one request
(decode at batch 10: the tensor-core kernel), and one chat completion through the OpenAI client,
and stops the server. Then transformers runs the same checkpoint through the reference dequantization, in
the same dtype on the same GPU, and generates greedily from the same prompt tokens. Reported:
per prompt, the number of leading tokens that agree and the logprob differences.

    python benchmarks/serve_check.py CKPT --out benchmarks/results/serve_check.json [--dtype float16]

``--dtype`` (default: the checkpoint's) sets both sides. bf16 and fp16 run the CUDA kernels;
float32 runs the plugin's torch path, which leaves only the engine's own arithmetic as a source
of differences.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at a temperature of",
    "In machine learning, overfitting means",
    "The quick brown fox",
    "To make a cup of tea, first",
    "The largest planet in the solar system is",
    "A haiku about the sea:",
]
NEW_TOKENS = 32


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 600) -> None:
    start = time.time()
    while time.time() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise TimeoutError("vllm serve did not become ready")


def start_server(ckpt: str, port: int, extra_args: list[str], log_path: str, max_model_len: int = 1024,
                 gpu_memory_utilization: float = 0.5,
                 quantization: str | None = "gqsa") -> tuple[subprocess.Popen, list[str], float]:
    """``vllm serve ckpt`` on loopback, ready; returns the process, its command and startup time.
    With ``quantization=None`` vLLM reads the method from the checkpoint's config.json."""
    quant = ["--quantization", quantization] if quantization else []
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", ckpt, *quant,
           "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "gqsa",
           "--max-model-len", str(max_model_len), "--gpu-memory-utilization", str(gpu_memory_utilization),
           "--generation-config", "vllm", *extra_args]
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(port, proc)
    except BaseException:
        stop_server(proc)
        raise
    return proc, cmd, time.time() - t0


def stop_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def greedy_completions(client, batched: bool = False) -> list[dict]:
    """PROMPTS completed greedily (NEW_TOKENS tokens each), with token ids and logprobs: one
    request per prompt, or (batched) one request for all, which the engine decodes together."""
    requests = [PROMPTS] if batched else [[p] for p in PROMPTS]
    completions = []
    for prompts in requests:
        r = client.completions.create(model="gqsa", prompt=prompts, max_tokens=NEW_TOKENS,
                                      temperature=0.0, logprobs=1,
                                      extra_body={"return_tokens_as_token_ids": True,
                                                  "ignore_eos": True})
        for choice in sorted(r.choices, key=lambda c: c.index):
            lp = choice.logprobs
            completions.append({
                "prompt": prompts[choice.index], "text": choice.text,
                "token_ids": [int(t.split(":")[1]) for t in lp.tokens],
                "logprobs": lp.token_logprobs})
    return completions


def query_server(ckpt: str, port: int, extra_args: list[str], log_path: str) -> dict:
    from openai import OpenAI

    proc, cmd, startup = start_server(ckpt, port, extra_args, log_path)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        completions = greedy_completions(client)
        batched = greedy_completions(client, batched=True)
        chat = client.chat.completions.create(
            model="gqsa", messages=[{"role": "user", "content": "Name three colors."}],
            max_tokens=32, temperature=0.0)
        return {"command": " ".join(cmd), "startup_seconds": round(startup, 1),
                "completions": completions, "batched_completions": batched,
                "chat": chat.choices[0].message.content}
    finally:
        stop_server(proc)


@torch.no_grad()
def greedy(model, prompt_ids: list[int], n: int = NEW_TOKENS) -> tuple[list[int], list[float]]:
    """``n`` greedy tokens after ``prompt_ids`` and each one's logprob, one full forward per token
    (slow, simple and exact), on the model's device."""
    seq = torch.tensor([prompt_ids], device=model.device)
    tokens, logprobs = [], []
    for _ in range(n):
        logits = model(input_ids=seq).logits[0, -1].float()
        nxt = int(logits.argmax())
        tokens.append(nxt)
        logprobs.append(float(torch.log_softmax(logits, -1)[nxt]))
        seq = torch.cat([seq, torch.tensor([[nxt]], device=model.device)], 1)
    return tokens, logprobs


@torch.no_grad()
def scored(model, prompt_ids: list[int], tokens: list[int]) -> list[float]:
    """The model's logprob of each of ``tokens`` after ``prompt_ids`` and the tokens before it
    (teacher forcing), so that served tokens can be compared even past a divergence."""
    seq = torch.tensor([prompt_ids + tokens], device=model.device)
    logp = torch.log_softmax(model(input_ids=seq).logits[0].float(), -1)
    return [float(logp[len(prompt_ids) - 1 + i, t]) for i, t in enumerate(tokens)]


@torch.no_grad()
def transformers_reference(ckpt: str, dtype: torch.dtype):
    from transformers import AutoTokenizer

    from converters.reference_model import load_reference_model

    tok = AutoTokenizer.from_pretrained(ckpt)
    model = load_reference_model(ckpt, dtype=dtype, device="cuda")
    out = []
    for prompt in PROMPTS:
        ids = tok(prompt).input_ids
        tokens, logprobs = greedy(model, ids)
        out.append({"token_ids": tokens, "logprobs": logprobs, "prompt_ids": ids})
    return out, model


def leading_agreement(a: list[int], b: list[int]) -> int:
    """How many leading tokens two generations share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@torch.no_grad()
def compare(served: list[dict], ref: list[dict], model) -> dict:
    """Leading agreement per prompt; logprob differences of the served tokens under both models."""
    rows = []
    for s, r in zip(served, ref):
        agree = leading_agreement(s["token_ids"], r["token_ids"])
        diffs = [abs(a - b) for a, b in zip(s["logprobs"], scored(model, r["prompt_ids"], s["token_ids"]))]
        rows.append({"prompt": s["prompt"], "agreeing_tokens": agree, "identical": agree == NEW_TOKENS,
                     "max_abs_logprob_diff": max(diffs), "mean_abs_logprob_diff": sum(diffs) / len(diffs)})
    return {"prompts_identical": sum(r["identical"] for r in rows), "prompts": len(rows), "per_prompt": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpt")
    p.add_argument("--out", required=True)
    p.add_argument("--port", type=int, default=8321)
    p.add_argument("--modes", default="graphs,eager")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="served and reference dtype (default: the checkpoint's)")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="GPUs the server shards the model over (the reference runs on one)")
    a = p.parse_args(argv)
    ckpt = os.path.abspath(a.ckpt)
    with open(os.path.join(ckpt, "config.json")) as f:
        dtype = getattr(torch, a.dtype or json.load(f).get("dtype", "bfloat16"))
    log_dir = os.path.dirname(os.path.abspath(a.out))
    tag = os.path.splitext(os.path.basename(a.out))[0]
    served = {}
    for mode in a.modes.split(","):
        extra = ["--enforce-eager"] if mode == "eager" else []
        extra += ["--dtype", str(dtype).removeprefix("torch."),
                  "--tensor-parallel-size", str(a.tensor_parallel_size)]
        served[mode] = query_server(ckpt, a.port, extra, os.path.join(log_dir, f"{tag}_{mode}.log"))
        print(mode, "served; chat:", served[mode]["chat"][:80], flush=True)
    ref, model = transformers_reference(ckpt, dtype)
    result = {"checkpoint": ckpt, "dtype": str(dtype), "device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "new_tokens": NEW_TOKENS, "command": " ".join(sys.argv),
              "tensor_parallel_size": a.tensor_parallel_size}
    import vllm

    result["vllm"] = vllm.__version__
    for mode, s in served.items():
        cmp = compare(s["completions"], ref, model)
        batched = compare(s["batched_completions"], ref, model)
        result[mode] = {"server_command": s["command"], "startup_seconds": s["startup_seconds"],
                        "chat_reply": s["chat"], **cmp,
                        "texts": [c["text"] for c in s["completions"]],
                        "batched": {**batched, "texts": [c["text"] for c in s["batched_completions"]]}}
        print(mode, f"{cmp['prompts_identical']}/{cmp['prompts']} prompts identical for {NEW_TOKENS} tokens;",
              f"batched: {batched['prompts_identical']}/{batched['prompts']}", flush=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
