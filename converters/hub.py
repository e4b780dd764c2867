# SPDX-License-Identifier: Apache-2.0
"""The Hugging Face Hub side of conversion: a model id as input (from the local cache when
HF_HUB_OFFLINE is set), a model card for the output, and ``--push-to-hub``."""

from __future__ import annotations

import os

# What a conversion reads from a Hub repository: config, weights, tokenizer, templates.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


class HubError(Exception):
    pass


def resolve_model(model: str) -> str:
    """A local folder as it is; otherwise a Hub model id ("org/name"), fetched into (or found in)
    the Hugging Face cache. Offline (HF_HUB_OFFLINE=1), only the cache is used."""
    if os.path.isdir(model) or os.path.isabs(model) or model.startswith(".") or model.count("/") != 1:
        return model  # a path: read_config reports it if it does not exist
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model, allow_patterns=HUB_PATTERNS)
    except Exception as e:  # offline and not cached, unknown repository, network failure
        raise HubError(f"{model!r} is no local folder, and cannot get it from the Hugging Face Hub or its "
                       f"local cache ({type(e).__name__}: {e})") from e


def check_can_push() -> None:
    """Before converting: the upload at the end needs the Hub and a token that it accepts, and a
    conversion can take hours, so a missing login is reported now rather than after it."""
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        raise HubError("--push-to-hub needs the Hub, but HF_HUB_OFFLINE is set")
    try:
        HfApi().whoami()
    except Exception as e:  # no token, a rejected token, no network
        raise HubError(f"--push-to-hub: the Hugging Face Hub did not accept this machine's login "
                       f"({type(e).__name__}: {e}); log in with `hf auth login` or set HF_TOKEN") from e


def push(folder: str, repo_id: str, private: bool = True) -> str:
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message="Upload GQSA checkpoint")
    except Exception as e:  # network, permissions, quota: the checkpoint itself is finished
        raise HubError(f"the checkpoint is written to {folder}, but uploading it to {repo_id} failed "
                       f"({type(e).__name__}: {e}); upload it later with `hf upload {repo_id} {folder}`") from e
    return str(url)


def _epochs(n: int) -> str:
    return f"{n} epoch{'' if n == 1 else 's'}"


def training_summary(training: dict) -> str:
    """One line on the BQPO and E2E-OQP stages of a conversion, for the model card."""
    parts = []
    if "bqpo" in training:
        b = training["bqpo"]
        parts.append(f"BQPO {_epochs(b['epochs'])} ({b['blocks_improved']}/{len(b['blocks'])} blocks improved "
                     f"on {b['held_out_samples']} held-out samples)")
    if "e2e" in training:
        e = training["e2e"]
        parts.append(f"E2E-OQP {_epochs(e['epochs'])} (held-out LM loss {e['val_loss_start']:.3f} -> "
                     f"{e['val_loss_best']:.3f}{'' if e['kept_trained'] else ', not better: scales kept'})")
    return "; ".join(parts) or "none (one-shot solver)"


def peak_text(peak: dict) -> str:
    """``peak_memory`` of a conversion report, for people."""
    gib = 1 / 2**30
    if "host_bytes" not in peak:  # reports written before the field existed
        return "not recorded"
    text = f"{peak['host_bytes'] * gib:.2f} GiB host"
    if "cuda_bytes" in peak:
        text += f", {peak['cuda_bytes'] * gib:.2f} GiB on the GPU"
    return text


def environment_text(env: dict) -> str:
    """``environment`` of a conversion report, for people (the same command elsewhere gives a
    slightly different checkpoint)."""
    if not env:  # reports written before the field existed
        return "not recorded"
    text = f"torch {env['torch']}, transformers {env['transformers']}, {env['cpu']} ({env['cpu_threads']} threads)"
    return text + (f", {env['gpu']}" if "gpu" in env else "")


def model_card(report: dict, source: str) -> str:
    """README.md for a converted checkpoint: what it is, how it was made, how to serve it."""
    q, c = report["quantization_config"], report["calibration"]
    mib = 1 / 2**20
    head = next((r for r in report.get("layers", []) if r["name"] == "lm_head"), None)
    head_text = "" if head is None else (
        f"The output layer (`lm_head`) is converted too, with "
        f"{100 * head['kept_groups'] * q['group_size'] * q['block_rows'] / (head['shape'][0] * head['shape'][1]):.0f}% "
        f"of its groups kept; it is stored apart from the embedding, which stays dense.\n")
    if q.get("modules_to_not_convert"):
        head_text += f"Left dense: {', '.join(q['modules_to_not_convert'])}.\n"
    return f"""---
tags: [gqsa, quantized, sparse, vllm]
library_name: vllm
---
# {os.path.basename(os.path.normpath(source))}: GQSA W{q['bits']} S{q['sparsity'] * 100:.0f}% g{q['group_size']}

GQSA (group quantization and sparsity) checkpoint made by `gqsa-convert` (vllm-gqsa) from `{source}`:
{q['sparsity'] * 100:.0f}% of the groups of {q['group_size']} consecutive input weights of the decoder layers pruned, the rest
quantized to {q['bits']} bits with a scale and zero point per group, in the GQSA format version
{q['format_version']}.
{head_text}
| | |
|---|---|
| converted layers | {report['quantized_layers']} ({', '.join(q['target_modules'])}) |
| kept groups | {report['kept_group_fraction'] * 100:.1f}% |
| bits per weight of the converted layers, all metadata included | {report['bits_per_weight_quantized_layers']:.3f} |
| checkpoint size | {report['checkpoint_bytes'] * mib:.1f} MiB (dense {report['dense_bytes'] * mib:.1f} MiB) |
| calibration | {c['n_samples']} x {c['seq_len']} tokens of {c['data']}, seed {c['seed']} |
| training | {training_summary(report.get("training") or {})} |
| conversion | {report['seconds']:.0f} s on {report['device']}, peak memory {peak_text(report.get('peak_memory', {}))} |
| environment | {environment_text(report.get('environment', {}))} |

Serve it with vLLM and the vllm-gqsa plugin installed:

```bash
vllm serve <this folder or repository>
```
"""
