# SPDX-License-Identifier: Apache-2.0
"""A GQSA checkpoint under load in ``vllm serve``: rising concurrency, cancelled requests and
over-long prompts mixed in, GPU memory sampled throughout, greedy outputs compared before and after.

    python benchmarks/load_test.py CKPT --minutes 10 --out benchmarks/results/gpu/load_test.json

Phases of ``--concurrency`` clients (default 1, 4, 16, 64) share the time. Each client loops over
requests drawn at random: 80% ordinary completions (20 to 400 prompt words, 16 to 256 tokens),
10% streamed and abandoned after the first chunks (a cancelled request), 10% prompts longer than
``--max-model-len``, which the server must refuse with HTTP 400, as an fp16 server would. Anything
else (another error, a timeout, an over-long prompt that is served) counts as a failure. Reported:
per phase the requests, failures, completion tokens/s and latency percentiles; GPU memory at the
start of the load, its maximum and at the end; whether the 10 greedy completions of the serving
check are token-for-token the same after the load as before it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_check import greedy_completions, start_server, stop_server  # noqa: E402

WORDS = ("the of and to in is was for on as with by at from his an were are which this be has or had "
         "it not but first one their its new after who they have her she two been other when there "
         "all during into school time may years more most only over city some world would where "
         "later up such used many can state about national out known university united then made").split()
MAX_MODEL_LEN = 1024


def gpu_memory_mib() -> float | None:
    """Memory used on the server's GPU (the first of CUDA_VISIBLE_DEVICES), as nvidia-smi reports it."""
    gpu = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
    try:
        out = subprocess.run(["nvidia-smi", "-i", gpu, "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        return float(out.split()[0])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


async def client_loop(client, rng: random.Random, until: float, stats: dict) -> None:
    import openai

    while time.time() < until:
        kind = rng.choices(("ok", "cancel", "too_long"), weights=(8, 1, 1))[0]
        words = rng.randint(20, 400) if kind != "too_long" else MAX_MODEL_LEN * 2
        prompt = " ".join(rng.choice(WORDS) for _ in range(words))
        max_tokens = rng.randint(16, 256)
        t0 = time.time()
        try:
            if kind == "cancel":
                stream = await client.completions.create(model="gqsa", prompt=prompt, max_tokens=max_tokens,
                                                         temperature=0.0, stream=True)
                chunks = 0
                async for _ in stream:
                    chunks += 1
                    if chunks >= 2:
                        break
                await stream.close()  # drops the connection: the server must abort the request
                stats["cancelled"] += 1
                continue
            r = await client.completions.create(model="gqsa", prompt=prompt, max_tokens=max_tokens,
                                                temperature=0.0, extra_body={"ignore_eos": True})
            if kind == "too_long":
                stats["failures"].append("an over-long prompt was served")
                continue
            stats["ok"] += 1
            stats["tokens"] += r.usage.completion_tokens
            stats["latency_s"].append(time.time() - t0)
        except openai.BadRequestError as e:
            if kind == "too_long":
                stats["rejected_too_long"] += 1
            else:
                stats["failures"].append(f"BadRequestError: {str(e)[:200]}")
        except Exception as e:  # anything else is a failed request
            stats["failures"].append(f"{type(e).__name__}: {str(e)[:200]}")


async def run_phase(port: int, concurrency: int, seconds: float, seed: int) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=300, max_retries=0)
    stats = {"concurrency": concurrency, "ok": 0, "cancelled": 0, "rejected_too_long": 0, "tokens": 0,
             "latency_s": [], "failures": []}
    start = time.time()
    until = start + seconds
    await asyncio.gather(*(client_loop(client, random.Random(seed * 1000 + i), until, stats)
                           for i in range(concurrency)))
    elapsed = time.time() - start
    lat = sorted(stats.pop("latency_s"))
    stats.update({"seconds": round(elapsed, 1), "completion_tokens_per_s": round(stats["tokens"] / elapsed, 1),
                  "latency_p50_s": round(statistics.median(lat), 3) if lat else None,
                  "latency_p99_s": round(lat[int(0.99 * (len(lat) - 1))], 3) if lat else None,
                  "failed": len(stats["failures"]), "failures": stats["failures"][:20]})
    return stats


async def sample_memory(samples: list, stop: asyncio.Event, every: float = 5.0) -> None:
    while not stop.is_set():
        samples.append((round(time.time(), 1), gpu_memory_mib()))
        try:
            await asyncio.wait_for(stop.wait(), every)
        except asyncio.TimeoutError:
            pass


async def load(port: int, phases: list[int], seconds_each: float) -> tuple[list[dict], list]:
    samples: list = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_memory(samples, stop))
    results = []
    for i, c in enumerate(phases):
        results.append(await run_phase(port, c, seconds_each, seed=i))
        print(json.dumps({k: v for k, v in results[-1].items() if k != "failures"}), flush=True)
    stop.set()
    await sampler
    return results, samples


def main(argv=None) -> int:
    from openai import OpenAI

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpt")
    p.add_argument("--out", required=True)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--port", type=int, default=8331)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5,
                   help="the server's share of GPU memory (lower it to share the GPU with other work)")
    a = p.parse_args(argv)
    phases = [int(c) for c in a.concurrency.split(",")]
    log_path = os.path.splitext(os.path.abspath(a.out))[0] + "_server.log"
    proc, cmd, startup = start_server(os.path.abspath(a.ckpt), a.port, [], log_path, MAX_MODEL_LEN,
                                      a.gpu_memory_utilization)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{a.port}/v1", api_key="none")
        before = greedy_completions(client)
        results, memory = asyncio.run(load(a.port, phases, 60 * a.minutes / len(phases)))
        after = greedy_completions(client)
    finally:
        stop_server(proc)
    used = [m for _, m in memory if m is not None]
    same = [b["token_ids"] == c["token_ids"] for b, c in zip(before, after)]
    out = {"command": " ".join(sys.argv), "server_command": " ".join(cmd), "startup_seconds": round(startup, 1),
           "phases": results, "failed_requests": sum(r["failed"] for r in results),
           "gpu_memory_mib": {"start": used[0] if used else None, "max": max(used) if used else None,
                              "end": used[-1] if used else None, "samples": memory},
           "greedy_identical_after_load": sum(same), "greedy_prompts": len(same)}
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"failed requests: {out['failed_requests']}; GPU memory MiB start/max/end: "
          f"{out['gpu_memory_mib']['start']}/{out['gpu_memory_mib']['max']}/{out['gpu_memory_mib']['end']}; "
          f"greedy identical after load: {sum(same)}/{len(same)}")
    return 0 if out["failed_requests"] == 0 and all(same) else 1


if __name__ == "__main__":
    sys.exit(main())
