# SPDX-License-Identifier: Apache-2.0
"""Convert a Hugging Face causal LM into a GQSA checkpoint, one decoder block at a time.

Only one block (and the calibration activations) lives on the compute device at a
time, so a 7B model converts on a GPU of modest memory, or on the CPU. Blocks are
quantized with the quantized outputs of the blocks before them as inputs (GPTQ's
order), and inside a block sub-layer by sub-layer ("true sequential"): q/k/v, then
o, then gate/up, then down.

An image-text model (Gemma 3 of 4B and more) is converted the same way, through its text
decoder; its image parts stay dense, and every tensor keeps the name the model's own checkpoint
gives it (:mod:`.layout`).

With ``quantize_output_layer`` the output layer (``lm_head``) is converted too, after the
blocks, on the final norm of the last block's quantized outputs; a tied output layer is untied
(the embedding, a lookup table, stays dense) and the checkpoint says ``tie_word_embeddings:
false``. It is off by default: the output layer is a large share of a step's bytes only in
models with large vocabularies, and its accuracy cost is the model's own to measure.

Two optional training stages recover accuracy (GQSA's BQPO and E2E-OQP): after the
solver, each block is trained to reproduce the dense block (:mod:`.bqpo`), and after all
blocks, the scales are trained on the model's LM loss (:mod:`.e2e`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import resource
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from vllm_gqsa.format import DEFAULT_TARGET_MODULES, FUSED_TARGET_MODULES, TENSOR_NAMES, GQSALayer, GQSAQuantConfig
from vllm_gqsa.reference import dequantize
from . import show_progress
from .bqpo import BlockTraining, train_block
from .calibration import calibration_samples
from .e2e import ScaleTraining, train_scales
from .hub import model_card, peak_text
from .layout import (IMAGE_TEXT_ARCHITECTURES, checkpoint_module, checkpoint_names, decoder, dense_parts,
                     rename, text_config)
from .owl import block_sparsities, outlier_ratio
from .solver import accumulate_hessian, solve_layer

logger = logging.getLogger(__name__)

# Decoders whose blocks have self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj, each served by
# vLLM's own model class for it (tests/test_plugin.py loads each on the CPU, tests/test_vllm_gpu.py
# serves each on a GPU).
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM",
                           "Qwen3ForCausalLM", "Gemma3ForCausalLM", "Gemma2ForCausalLM",
                           "GraniteForCausalLM", "Olmo3ForCausalLM", "Exaone4ForCausalLM",
                           "SeedOssForCausalLM", "Ernie4_5ForCausalLM",
                           "Phi3ForCausalLM") + IMAGE_TEXT_ARCHITECTURES
# Their q/k/v and gate/up are one layer each in the checkpoint, converted as such (and split into
# vLLM's shards by the plugin).
FUSED_ARCHITECTURES = ("Phi3ForCausalLM",)
# vLLM's model class for these requires the output layer tied to the embedding, so it stays dense.
TIED_OUTPUT_LAYER = ("Gemma2ForCausalLM",)
# Sub-layers quantized together because they read the same input, in forward order.
SEQUENTIAL_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.qkv_proj",),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.gate_up_proj",),
    ("mlp.down_proj",),
)
OUTPUT_LAYER = "lm_head"  # the output layer's module name in every supported architecture
SHARD_BYTES = 2 << 30  # safetensors shard size
# Files of the input folder copied as they are (tokenizer, chat template, generation config).
COPIED_SUFFIXES = (".json", ".model", ".txt", ".jinja", ".tiktoken")
NOT_COPIED = ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")
COMPLETE_MARKER = "gqsa_report.json"  # written last: a folder without it is not a finished checkpoint
PROGRESS = "progress.json"  # in the partial folder: finished blocks, for --resume
BLOCKS_DIR = "blocks"  # in the partial folder: one safetensors file per finished block
DISK_MARGIN = 1.2  # free space asked for, as a multiple of the estimated checkpoint size
# seconds: the time earlier runs spent up to their last finished block, so that a resumed
# conversion reports the time of the whole conversion, not of its last run.
NO_PROGRESS = {"blocks_done": 0, "layers": [], "bqpo": [], "seconds": 0.0}


class ConvertError(Exception):
    """A conversion that cannot start or go on; the message says why and what to do."""


@dataclass
class ConvertOptions:
    bits: int = 4
    group_size: int = 16
    sparsity: float = 0.5
    block_rows: int = 1
    # "pairs": one group of each aligned pair kept per row block (sparsity 0.5), for the sparse
    # tensor cores; "groups": any groups, by saliency.
    pattern: str = "groups"
    # OWL: blocks with more outlier weights keep more groups, at the same mean sparsity (.owl);
    # 0 gives every block ``sparsity``.
    owl_lambda: float = 0.0
    # The MLP layers' sparsity; each block's attention layers then take what keeps the block's mean
    # (counted in groups) at its sparsity. None: every layer at its block's sparsity.
    mlp_sparsity: float | None = None
    calib_data: str | None = None
    n_samples: int = 128
    seq_len: int = 512
    seed: int = 0
    device: str = "auto"
    batch_size: int = 8
    true_sequential: bool = True
    clip_search: bool = True
    skip_modules: tuple[str, ...] = field(default_factory=tuple)
    quantize_output_layer: bool = False
    output_layer_sparsity: float = 0.0
    # Training stages; 0 epochs turns a stage off. See the CLI help for why these defaults.
    bqpo_epochs: int = 2
    bqpo_lr_weight: float = 0.05
    bqpo_lr_quant: float = 0.02
    bqpo_batch_size: int = 2
    e2e_epochs: int = 1
    e2e_lr: float = 2e-3
    e2e_batch_size: int = 2
    val_samples: int = 8  # calibration samples held out from training, at most half of them
    overwrite: bool = False
    resume: bool = False

    def fingerprint(self) -> dict:
        """The options that decide the result: a resumed conversion must match them."""
        d = asdict(self)
        for k in ("device", "batch_size", "overwrite", "resume"):
            d.pop(k)
        # The settings of a stage that is off change nothing.
        off = [p for p, epochs in (("bqpo_", self.bqpo_epochs), ("e2e_", self.e2e_epochs)) if not epochs]
        for k in [k for k in d if k.startswith(tuple(off)) and not k.endswith("_epochs")]:
            d.pop(k)
        if not self.trains:
            d.pop("val_samples")
        d["skip_modules"] = list(d["skip_modules"])
        if not self.quantize_output_layer:  # as recorded before the option existed
            d.pop("quantize_output_layer")
            d.pop("output_layer_sparsity")
        if self.pattern == "groups":  # likewise
            d.pop("pattern")
        if not self.owl_lambda:  # likewise
            d.pop("owl_lambda")
        if self.mlp_sparsity is None:  # likewise
            d.pop("mlp_sparsity")
        return d

    @property
    def trains(self) -> bool:
        return self.bqpo_epochs > 0 or self.e2e_epochs > 0

    def held_out(self) -> int:
        """Calibration samples (the last ones) held out from training for the stages' checks."""
        return min(self.val_samples, self.n_samples // 2)

    def block_training(self, block: int) -> BlockTraining:
        return BlockTraining(self.bqpo_epochs, self.bqpo_lr_weight, self.bqpo_lr_quant,
                             self.bqpo_batch_size, seed=self.seed * 100003 + block)

    def scale_training(self) -> ScaleTraining:
        return ScaleTraining(self.e2e_epochs, self.e2e_lr, self.e2e_batch_size, seed=self.seed)

    def quant_config(self, fused: bool = False) -> GQSAQuantConfig:
        """The checkpoint's config; ``fused`` for a model whose q/k/v and gate/up are one layer each."""
        targets = ((FUSED_TARGET_MODULES if fused else DEFAULT_TARGET_MODULES)
                   + ((OUTPUT_LAYER,) if self.quantize_output_layer else ()))
        return GQSAQuantConfig(bits=self.bits, group_size=self.group_size, block_rows=self.block_rows,
                               sparsity=self.sparsity, pattern=self.pattern, target_modules=targets,
                               modules_to_not_convert=tuple(self.skip_modules))


def read_config(model_dir: str) -> dict:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isdir(model_dir):
        raise ConvertError(f"model folder {model_dir} does not exist")
    if not os.path.isfile(path):
        raise ConvertError(f"{model_dir} has no config.json: not a Hugging Face model folder")
    try:
        with open(path) as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ConvertError(f"{path} holds a JSON {type(config).__name__}, not an object")
    archs = config.get("architectures") or []
    if not archs or archs[0] not in SUPPORTED_ARCHITECTURES:
        raise ConvertError(f"unsupported architecture {archs[0] if archs else 'unknown'!r} in {path}; "
                           f"gqsa-convert supports {', '.join(SUPPORTED_ARCHITECTURES)}")
    if "quantization_config" in config:
        method = config["quantization_config"].get("quant_method", "?")
        raise ConvertError(f"{model_dir} is already quantized ({method}); start from the dense model")
    return config


def check_shapes(config: dict, qcfg: GQSAQuantConfig) -> None:
    """Fail before loading anything if a layer's sizes do not fit the group size."""
    config = text_config(config)
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    sizes = {"hidden_size": hidden, "intermediate_size": config["intermediate_size"],
             "num_attention_heads * head_dim": heads * head_dim}
    for what, k in sizes.items():
        if k % qcfg.group_size:
            raise ConvertError(f"{what} = {k} is not a multiple of --group-size {qcfg.group_size}; "
                               f"choose a group size that divides it")
        if qcfg.pattern == "pairs" and k % (2 * qcfg.group_size):
            # Every converted layer reads one of these sizes, and must hold whole pairs of groups.
            raise ConvertError(f"{what} = {k} (the input size of some layers) is not a multiple of "
                               f"2 * --group-size = {2 * qcfg.group_size}, which --pattern pairs needs; "
                               f"use --pattern groups or a group size that divides {k // 2}")
    kv = config.get("num_key_value_heads", heads) * head_dim
    rows = {**sizes, "num_key_value_heads * head_dim": kv}
    if OUTPUT_LAYER in qcfg.target_modules:
        rows["vocab_size (the output layer's rows)"] = config["vocab_size"]
    for what, n in rows.items():
        if n % qcfg.block_rows:
            raise ConvertError(f"{what} = {n} is not a multiple of --block-rows {qcfg.block_rows}")


def prepare_output(out_dir: str, overwrite: bool, resume: bool, estimated_bytes: int) -> str:
    """Check the output location early and return the temporary folder to write into."""
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise ConvertError(f"output {out_dir} already exists; pass --overwrite to replace it")
    try:
        os.makedirs(parent, exist_ok=True)
        # A real write: permission bits say nothing for root, a read-only mount or a full quota.
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise ConvertError(f"cannot write to {parent}: {e.strerror or e}") from None
    free = shutil.disk_usage(parent).free
    if free < DISK_MARGIN * estimated_bytes:
        raise ConvertError(f"not enough free disk space in {parent}: the checkpoint needs about "
                           f"{estimated_bytes / 2**30:.2f} GiB, {free / 2**30:.2f} GiB are free")
    tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.partial")
    if not resume:
        shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, BLOCKS_DIR), exist_ok=True)
    return tmp


def check_output_location(model_dir: str, out_dir: str, may_replace_input: bool = False) -> None:
    """Refuse an output folder that is the input or holds it: replacing it (``--overwrite``)
    would delete the model being converted. An output inside the input is harmless, and so is
    replacing the input where it was read whole before anything is written (``may_replace_input``)."""
    src, out = os.path.realpath(model_dir), os.path.realpath(out_dir)
    if (src == out and not may_replace_input) or src.startswith(out.rstrip(os.sep) + os.sep):
        raise ConvertError(f"output {out_dir} {'is' if src == out else 'contains'} the input model {model_dir}; "
                           f"choose another output folder")


def check_skip_modules(skip: tuple[str, ...], names: dict[str, str]) -> None:
    """Refuse a --skip entry that names no module: it would leave nothing dense, silently. Entries
    are checkpoint names (``names``' values), as ``modules_to_not_convert``, which vLLM reads."""
    saved = list(names.values())
    for m in skip:
        if any(n.startswith(m + ".") for n in saved):
            continue
        # An image-text model's modules are named otherwise in memory than in its checkpoint.
        in_memory = next((k for k in names if k.startswith(m + ".")), None)
        rest = in_memory[len(m):] if in_memory else None
        hint = (f" (transformers' name in memory; the checkpoint's is {names[in_memory][:-len(rest)]})"
                if rest and names[in_memory].endswith(rest) else "")
        example = next((n.rsplit(".", 1)[0] for n in saved if n.endswith("mlp.down_proj.weight")), None)
        raise ConvertError(f"--skip {m}: the model has no module of that name{hint}; give a layer or "
                           f"part of the model by its name in the checkpoint"
                           + (f", such as {example}" if example else ""))


def estimate_checkpoint_bytes(model_dir: str, qcfg: GQSAQuantConfig) -> int:
    """An upper bound of the output size: the input's weight files at the GQSA bit rate of
    unpruned groups (most of a model's bytes are in the converted layers)."""
    dense = sum(os.path.getsize(os.path.join(model_dir, n)) for n in os.listdir(model_dir)
                if n.endswith((".safetensors", ".bin")))
    bits = qcfg.bits + 16 / qcfg.group_size + 1  # codes, scale, zero point and index
    return int(dense * bits / 16) + (1 << 20)


def _read_progress(tmp: str, model_dir: str, opts: ConvertOptions) -> dict:
    """What an interrupted run of the same conversion finished; nothing for a fresh start."""
    path = os.path.join(tmp, PROGRESS)
    if not os.path.exists(path):
        return dict(NO_PROGRESS)
    with open(path) as f:
        progress = json.load(f)
    if progress.get("source") != os.path.abspath(model_dir) or progress.get("options") != opts.fingerprint():
        raise ConvertError(f"cannot resume from {tmp}: it was started from another model or with other "
                           "options; run without --resume to start over")
    logger.info("resuming: %d blocks already converted", progress["blocks_done"])
    return progress


def _write_progress(tmp: str, model_dir: str, opts: ConvertOptions, blocks_done: int, layers: list,
                    bqpo: list, seconds: float) -> None:
    path = os.path.join(tmp, PROGRESS)
    with open(path + ".tmp", "w") as f:
        json.dump({"source": os.path.abspath(model_dir), "options": opts.fingerprint(),
                   "blocks_done": blocks_done, "layers": layers, "bqpo": bqpo, "seconds": seconds}, f)
    os.replace(path + ".tmp", path)  # atomic: a kill leaves the old or the new file, never half


def peak_memory(device: torch.device) -> dict:
    """This process's peak resident host memory so far and, on CUDA, the peak tensor memory on the
    device: what a user has to provision to run the same conversion."""
    peak = {"host_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # Linux: KiB
    if device.type == "cuda":
        peak["cuda_bytes"] = torch.cuda.max_memory_allocated(device)
    return peak


def environment(device: torch.device) -> dict:
    """What the checkpoint depends on besides the command. The solver's sums depend on the thread
    count, the CPU or GPU and the libraries, and the pruning choices amplify small differences in
    them: the same command in another environment gives a slightly different checkpoint (1.2% of
    perplexity apart on SmolLM2-135M between two CPU environments)."""
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__,
           "cpu": _cpu_model(), "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _cpu_model() -> str:
    try:  # Linux names the model here; platform.processor() often says only "x86_64"
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def check_finite(model) -> None:
    """Refuse weights that hold NaN or infinity. The solver would turn them into a checkpoint that
    validates and loads, and computes garbage."""
    for name, p in model.named_parameters():
        bad = ~torch.isfinite(p)
        if bad.any():
            raise ConvertError(f"{name} holds {int(bad.sum())} non-finite value(s) (NaN or infinity): "
                               "the model's weights are damaged; nothing was converted")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cuda", "cpu"):
        raise ConvertError(f"unknown --device {name!r}; use cuda, cuda:N, cpu or auto")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConvertError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s); "
                           f"use --device cpu, or auto")
    return device


class _StopForward(Exception):
    pass


class _Recorder(torch.nn.Module):
    """Stands in for a block to record what the model feeds it. Block 0 keeps every sample's
    hidden states; every block keeps its keyword arguments, which differ between blocks in
    models whose layers alternate sliding and full attention (Gemma 3: other rotary tables
    and masks). Blocks pass their input on unchanged and the last stops the forward, so the
    dense blocks never run here."""

    def __init__(self, layer, first: bool, last: bool):
        super().__init__()
        self.layer, self.first, self.last = layer, first, last
        self.attention_type = getattr(layer, "attention_type", None)
        self.inputs: list[torch.Tensor] = []
        self.kwargs: dict = {}

    def forward(self, hidden_states, *args, **kwargs):
        if self.first:
            self.inputs.append(hidden_states)
        self.kwargs = kwargs
        if self.last:
            raise _StopForward
        return hidden_states


def _block_inputs(model, samples: torch.Tensor, device) -> tuple[list[torch.Tensor], list[dict]]:
    """Block 0's input for every sample, and each block's keyword arguments (blocks of the same
    attention type share one dict)."""
    _, dec = decoder(model)
    layers = dec.layers
    n = len(layers)
    recorders = [_Recorder(layers[i], i == 0, i == n - 1) for i in range(n)]
    for i, r in enumerate(recorders):
        layers[i] = r
    # What runs before the blocks (the embedding, the rotary tables: one module or one per
    # attention type, depending on the transformers release) goes to the device for this pass.
    outer = [m for name, m in dec.named_children() if name != "layers"]
    for m in outer:
        m.to(device)
    try:
        for s in samples:
            try:
                model(input_ids=s.unsqueeze(0).to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        for i, r in enumerate(recorders):
            layers[i] = r.layer
        for m in outer:
            m.to("cpu")
    shared: dict[tuple, dict] = {}
    kwargs = []
    for r in recorders:
        kw = {k: v for k, v in r.kwargs.items() if k not in ("past_key_values", "cache", "use_cache")}
        kwargs.append(shared.setdefault(tuple((k, id(v)) for k, v in kw.items()), kw))
    return [x.float() for x in recorders[0].inputs], kwargs


def _to(obj, device, dtype=None, _memo: dict | None = None):
    """``obj`` (tensors in nested dicts, lists and tuples) on ``device``, floating-point tensors in
    ``dtype``; an object met twice is converted once, so shared tensors stay shared."""
    memo = {} if _memo is None else _memo
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, torch.Tensor):
        out = obj.to(device, dtype) if (dtype is not None and obj.is_floating_point()) else obj.to(device)
    elif isinstance(obj, dict):
        out = {k: _to(v, device, dtype, memo) for k, v in obj.items()}
    elif isinstance(obj, (tuple, list)):
        out = type(obj)(_to(o, device, dtype, memo) for o in obj)
    else:
        out = obj
    memo[id(obj)] = out
    return out


def _run_block(block, inputs: list[torch.Tensor], kwargs: dict, batch_size: int) -> list[torch.Tensor]:
    outputs = []
    for i in range(0, len(inputs), batch_size):
        x = torch.cat(inputs[i:i + batch_size])
        y = block(x, **kwargs)
        y = y[0] if isinstance(y, tuple) else y
        outputs.extend(y.split(1))
    return outputs


def sequential_groups(block) -> list[tuple[str, ...]]:
    """The ``SEQUENTIAL_GROUPS`` this block has (Phi-3's fused layers or the separate ones)."""
    modules = dict(block.named_modules())
    return [g for g in SEQUENTIAL_GROUPS if all(n in modules for n in g)]


def converted_groups(block, prefix, names, qcfg) -> list[list[str]]:
    """The block's sequential groups, each cut to the layers the conversion converts (the block's
    module name is ``prefix``; ``names`` maps weight names to the checkpoint's); empty ones dropped."""
    groups = [[n for n in g if qcfg.is_quantized(checkpoint_module(names, prefix + n))]
              for g in sequential_groups(block)]
    return [g for g in groups if g]


def layer_sparsities(block, layers: list[str], mean: float, mlp: float | None, b: int) -> dict[str, float]:
    """The sparsity of each converted layer of block ``b`` (``layers``, names inside the block):
    ``mean`` for all, or with ``mlp`` given, the MLP layers at ``mlp`` and the attention layers at
    what keeps the block's kept groups at ``1 - mean`` of its groups."""
    if mlp is None:
        return {n: mean for n in layers}
    weights = {n: _module(block, n).weight.numel() for n in layers}  # groups in proportion: one G for all
    in_mlp = {n: n.startswith("mlp.") for n in layers}
    p = sum(w for n, w in weights.items() if in_mlp[n])
    a = sum(w for n, w in weights.items() if not in_mlp[n])
    if not a or not p:
        raise ConvertError(f"--mlp-sparsity needs both attention and MLP layers converted; block {b} "
                           f"converts {'no attention' if not a else 'no MLP'} layers")
    attention = (mean * (a + p) - mlp * p) / a
    if not 0.0 <= attention < 1.0:
        raise ConvertError(f"--mlp-sparsity {mlp} with a mean sparsity of {mean:g}: block {b}'s attention "
                           f"layers would need sparsity {attention:.3f}, outside [0, 1); the MLP layers "
                           f"hold {p / (a + p):.0%} of its weights")
    return {n: mlp if in_mlp[n] else attention for n in layers}


def _module(block, path: str):
    for part in path.split("."):
        block = getattr(block, part)
    return block


def convert(model_dir: str, out_dir: str, opts: ConvertOptions) -> dict:
    """Convert ``model_dir`` into a GQSA checkpoint at ``out_dir``; returns the report."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t_start = time.time()
    config = read_config(model_dir)
    arch = config["architectures"][0]
    qcfg = opts.quant_config(fused=arch in FUSED_ARCHITECTURES)
    check_shapes(config, qcfg)
    if opts.quantize_output_layer and arch in TIED_OUTPUT_LAYER:
        raise ConvertError(f"--quantize-output-layer: vLLM serves {arch} only with its output layer tied "
                           f"to the embedding, which stays dense")
    if not 0 < opts.n_samples or not 0 < opts.seq_len:
        raise ConvertError("--n-samples and --seq-len must be positive")
    if not 0.0 <= opts.output_layer_sparsity < 1.0:
        raise ConvertError(f"--output-layer-sparsity {opts.output_layer_sparsity} must be in [0, 1)")
    if opts.output_layer_sparsity and not opts.quantize_output_layer:
        raise ConvertError("--output-layer-sparsity applies only with --quantize-output-layer (the output "
                           "layer stays dense without it); pass both or neither")
    if opts.quantize_output_layer and not qcfg.is_quantized(OUTPUT_LAYER):
        # The checkpoint would hold GQSA tensors for a layer its config lists as dense.
        raise ConvertError(f"--quantize-output-layer and --skip {OUTPUT_LAYER} contradict each other; "
                           f"pass one of them")
    if opts.owl_lambda < 0:
        raise ConvertError(f"--owl-lambda {opts.owl_lambda} must be 0 (off) or more")
    if opts.owl_lambda and opts.pattern == "pairs":
        raise ConvertError("--owl-lambda: --pattern pairs keeps one group of every two in every block; "
                           "block sparsities cannot differ")
    shift = 2 * opts.owl_lambda  # the most block_sparsities moves a block, either way
    if opts.sparsity - shift < 0 or opts.sparsity + shift >= 1:  # --sparsity itself is in [0, 1)
        raise ConvertError(f"--owl-lambda {opts.owl_lambda} could move a block's sparsity by up to "
                           f"{shift:g} from --sparsity {opts.sparsity}, outside [0, 1); "
                           f"choose a smaller lambda")
    if opts.mlp_sparsity is not None:
        if not 0.0 <= opts.mlp_sparsity < 1.0:
            raise ConvertError(f"--mlp-sparsity {opts.mlp_sparsity} must be in [0, 1)")
        if opts.pattern == "pairs":
            raise ConvertError("--mlp-sparsity: --pattern pairs keeps one group of every two in every layer; "
                               "layer sparsities cannot differ")
    if opts.batch_size < 1:
        raise ConvertError(f"--batch-size {opts.batch_size} must be 1 or more")
    if min(opts.bqpo_epochs, opts.e2e_epochs) < 0:
        raise ConvertError("--bqpo-epochs and --e2e-epochs must be 0 (stage off) or more")
    if opts.trains and (opts.held_out() < 1 or min(opts.bqpo_batch_size, opts.e2e_batch_size) < 1):
        raise ConvertError("the training stages need --n-samples 2 or more, --val-samples 1 or more "
                           "and positive batch sizes; or turn them off with --bqpo-epochs 0 "
                           "--e2e-epochs 0")
    device = pick_device(opts.device)
    check_output_location(model_dir, out_dir)
    tmp = prepare_output(out_dir, opts.overwrite, opts.resume, estimate_checkpoint_bytes(model_dir, qcfg))
    progress = _read_progress(tmp, model_dir, opts) if opts.resume else dict(NO_PROGRESS)
    if opts.resume and os.path.exists(os.path.join(tmp, COMPLETE_MARKER)):
        return _publish_finished(tmp, model_dir, out_dir)
    torch.manual_seed(opts.seed)

    logger.info("loading %s", model_dir)
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").eval()
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        except (OSError, ValueError, SafetensorError) as e:  # missing, truncated or corrupt files
            raise ConvertError(f"cannot load the model in {model_dir}: {e}") from None
        model.config.use_cache = False
        max_positions = text_config(config).get("max_position_embeddings")
        if max_positions and opts.seq_len > max_positions:
            logger.warning("--seq-len %d is longer than the model's %d positions: it is calibrated on "
                           "sequences it was not trained for", opts.seq_len, max_positions)
        samples = calibration_samples(tokenizer, opts.calib_data, opts.n_samples, opts.seq_len, opts.seed,
                                      vocab_size=text_config(config).get("vocab_size"))
        names = checkpoint_names(model)
        check_skip_modules(opts.skip_modules, names)
        check_finite(model)
    except (ValueError, ConvertError, FileNotFoundError) as e:
        if not opts.resume:  # nothing done yet: leave no partial folder behind
            shutil.rmtree(tmp, ignore_errors=True)
        raise ConvertError(str(e)) from None
    save_dtype = next(model.parameters()).dtype
    # Tied as loaded, not as config.json says: the file may leave tie_word_embeddings out and mean
    # the class's default (True for Gemma 3); a tied output layer is not stored.
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    towers = dense_parts(model, names)
    if towers:  # an image-text model: its image parts stay dense
        logger.info("converting the text decoder; %s stay dense", ", ".join(towers))
        qcfg = dataclasses.replace(qcfg, modules_to_not_convert=qcfg.modules_to_not_convert + towers)
    dec_prefix, dec = decoder(model)
    if opts.mlp_sparsity is not None:  # an impossible split fails here, before any work
        try:
            for b, blk in enumerate(dec.layers):
                layers = [n for g in converted_groups(blk, f"{dec_prefix}.layers.{b}.", names, qcfg) for n in g]
                for mean in {qcfg.sparsity - 2 * opts.owl_lambda, qcfg.sparsity + 2 * opts.owl_lambda}:
                    layer_sparsities(blk, layers, mean, opts.mlp_sparsity, b)  # OWL's extremes
        except ConvertError:
            if not opts.resume:
                shutil.rmtree(tmp, ignore_errors=True)
            raise

    fmt = qcfg.layer_format()
    tensors: dict[str, torch.Tensor] = {}
    layers_report = list(progress["layers"])
    bqpo_report = list(progress["bqpo"])
    earlier_seconds = progress.get("seconds", 0.0)  # progress files of older releases lack it
    with torch.no_grad():
        inputs, block_kwargs = _block_inputs(model, samples, device)
        block_kwargs = _to(block_kwargs, device, torch.float32)
        # BQPO's targets: the dense blocks fed the dense model's own stream.
        dense_inputs = list(inputs) if opts.bqpo_epochs else None
        blocks = dec.layers
        block_sparsity = [qcfg.sparsity] * len(blocks)
        if opts.owl_lambda:
            ratios = _outlier_ratios(blocks, inputs, block_kwargs, dec_prefix, names, qcfg, device,
                                     opts.batch_size, save_dtype)
            block_sparsity = block_sparsities(ratios, qcfg.sparsity, opts.owl_lambda)
            logger.info("OWL block sparsities: %s", " ".join(f"{s:.3f}" for s in block_sparsity))
        # Each layer's sparsity (impossible --mlp-sparsity splits were rejected before any block ran).
        sparsities = [layer_sparsities(blk, [n for g in converted_groups(blk, f"{dec_prefix}.layers.{b}.", names, qcfg)
                                             for n in g], block_sparsity[b], opts.mlp_sparsity, b)
                      for b, blk in enumerate(blocks)]
        if opts.mlp_sparsity is not None:
            logger.info("attention sparsity per block: %s", " ".join(
                f"{next(v for n, v in s.items() if not n.startswith('mlp.')):.3f}" for s in sparsities))
        bar = tqdm(range(len(blocks)), desc="GQSA blocks", unit="block",
                   disable=not show_progress())  # off with gqsa-convert -q
        for b in bar:
            block, kwargs = blocks[b].to(device, torch.float32), block_kwargs[b]
            prefix = f"{dec_prefix}.layers.{b}."  # the block's module name
            block_file = os.path.join(tmp, BLOCKS_DIR, f"block_{b:05d}.safetensors")
            if dense_inputs is not None:
                dense_inputs = _run_block(block, dense_inputs, kwargs, opts.batch_size)
            if b < progress["blocks_done"]:
                block_tensors = _restore_block(block, prefix, block_file, layers_report, fmt)
            else:
                latents = {} if dense_inputs is not None else None
                block_qcfg = dataclasses.replace(qcfg, sparsity=block_sparsity[b])
                block_tensors = _convert_block(block, prefix, names, inputs, kwargs, block_qcfg, opts,
                                               layers_report, bar, latents, sparsities[b])
                if dense_inputs is not None and block_tensors:  # a block left dense has nothing to train
                    block_tensors = _train_block(block, b, prefix, block_tensors, latents, inputs, dense_inputs,
                                                 kwargs, layers_report, opts, fmt, bqpo_report, bar)
                del latents
                save_file(block_tensors, block_file)
                _write_progress(tmp, model_dir, opts, b + 1, layers_report, bqpo_report,
                                earlier_seconds + time.time() - t_start)
            tensors.update(block_tensors)
            # The next block is calibrated on this block's quantized outputs.
            inputs = _run_block(block, inputs, kwargs, opts.batch_size)
            blocks[b] = block.to("cpu", save_dtype)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if opts.quantize_output_layer:
            tensors.update(_convert_output_layer(model, inputs, qcfg, opts, device, layers_report))
        del inputs, dense_inputs

    quantized = {r["name"] for r in layers_report}
    for name, t in model.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if module in quantized and name.endswith(".weight"):
            continue
        if name == f"{OUTPUT_LAYER}.weight" and tied:
            continue
        tensors[name] = t.detach().to("cpu").contiguous()
    training = {}
    if opts.bqpo_epochs:
        training["bqpo"] = {"epochs": opts.bqpo_epochs, "lr_weight": opts.bqpo_lr_weight,
                            "lr_quant": opts.bqpo_lr_quant, "batch_size": opts.bqpo_batch_size,
                            "held_out_samples": opts.held_out(),
                            "blocks_improved": sum(r["kept_trained"] for r in bqpo_report),
                            "blocks": bqpo_report}
    if opts.e2e_epochs and not layers_report:
        logger.info("E2E-OQP skipped: every layer was left dense (--skip)")
    elif opts.e2e_epochs:
        # After every block and in the partial folder: an interrupted run leaves no checkpoint,
        # and --resume restores the blocks and runs this stage again.
        layers = _block_layers(tensors, layers_report, "", fmt)  # the output layer's scales too
        trained, e2e_report = train_scales(model, layers, samples, opts.held_out(), opts.scale_training(),
                                           device)
        for name, layer in trained.items():
            tensors[f"{name}.scales"] = layer.scales.contiguous()
        training["e2e"] = {"epochs": opts.e2e_epochs, "lr": opts.e2e_lr, "batch_size": opts.e2e_batch_size,
                           "held_out_samples": opts.held_out(), **e2e_report}
    # Stored under the names of the model's own checkpoints, which vLLM reads.
    tensors = {rename(names, n): t for n, t in tensors.items()}
    layers_report = [{**r, "name": checkpoint_module(names, r["name"])} for r in layers_report]
    report = _write_checkpoint(model_dir, tmp, config, qcfg, tensors, layers_report, opts, model,
                               earlier_seconds + time.time() - t_start, training, tied,
                               block_sparsity if opts.owl_lambda else None)
    _clean_up_and_publish(tmp, out_dir)
    return report


def _clean_up_and_publish(tmp: str, out_dir: str) -> None:
    """Drop the resume state from a finished partial folder and move it into place. A run killed
    in here leaves the checkpoint finished (its marker written), which --resume publishes; the
    progress file goes last, so that --resume can check the options against it until then."""
    shutil.rmtree(os.path.join(tmp, BLOCKS_DIR), ignore_errors=True)
    if os.path.exists(os.path.join(tmp, PROGRESS)):
        os.remove(os.path.join(tmp, PROGRESS))
    _publish(tmp, out_dir)


def _publish_finished(tmp: str, model_dir: str, out_dir: str) -> dict:
    """--resume of a run killed after its checkpoint was finished: publish it as it is (its
    progress.json, if still there, was checked against the options already)."""
    with open(os.path.join(tmp, COMPLETE_MARKER)) as f:
        report = json.load(f)
    if report.get("source") != os.path.abspath(model_dir):
        raise ConvertError(f"cannot resume from {tmp}: it holds a checkpoint of {report.get('source')}; "
                           "run without --resume to start over")
    logger.info("resuming: the checkpoint was already finished; moving it into place")
    _clean_up_and_publish(tmp, out_dir)
    return report


def _convert_block(block, prefix, names, inputs, kwargs, qcfg, opts, layers_report, bar,
                   latents: dict | None = None, sparsity: dict | None = None) -> dict[str, torch.Tensor]:
    """Prune and quantize the target layers of the block named ``prefix`` in place; return their
    GQSA tensors. ``names`` maps the model's weight names to the checkpoint's, which
    ``modules_to_not_convert`` uses. ``latents``, if given, receives the solver's unrounded weights
    by layer name (for BQPO). ``sparsity`` gives a layer's own sparsity (else ``qcfg.sparsity``)."""
    fmt = qcfg.layer_format()
    out = {}
    groups = converted_groups(block, prefix, names, qcfg)
    # True sequential: one calibration pass per group, so each group sees the outputs of the
    # groups quantized before it. Otherwise one pass for all.
    for stage in ([[g] for g in groups] if opts.true_sequential else [groups]):
        hessians = _collect_hessians(block, stage, inputs, kwargs, opts.batch_size)
        for H, group in zip(hessians, stage):
            for n in group:
                m = _module(block, n)
                res = solve_layer(m.weight, H, fmt, (sparsity or {}).get(n, qcfg.sparsity), opts.clip_search,
                                  qcfg.pattern)
                m.weight.data = res.weight.to(m.weight.dtype)
                if latents is not None:
                    latents[n] = res.latent
                name = prefix + n
                for t_name, t in res.layer.tensors().items():
                    out[f"{name}.{t_name}"] = t.contiguous()
                layers_report.append(_layer_record(name, res))
                bar.set_postfix(layer=n, loss=f"{res.loss:.3g}")
    return out


def _layer_record(name: str, res) -> dict:
    """A converted layer's line in the report."""
    return {"name": name, "shape": [res.layer.out_features, res.layer.in_features],
            "kept_groups": res.layer.nnz, "bits_per_weight": round(res.layer.bits_per_weight(), 4),
            "loss": res.loss}


def _convert_output_layer(model, inputs, qcfg, opts, device, layers_report) -> dict[str, torch.Tensor]:
    """Prune and quantize the output layer in place, calibrated on what it reads: the final norm
    of the last block's (quantized) outputs. Returns its GQSA tensors."""
    head = model.get_output_embeddings()
    if head is None or head is not getattr(model, OUTPUT_LAYER, None):
        raise ConvertError(f"{type(model).__name__} has no {OUTPUT_LAYER} output layer to quantize")
    if head.weight is model.get_input_embeddings().weight:
        # Tied: the embedding keeps the dense weights, the output layer gets its own copy.
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "text_config"):
            model.config.text_config.tie_word_embeddings = False
    N, K = head.weight.shape
    # At its own sparsity, so in the free pattern whatever --pattern says (which, like --sparsity,
    # is the decoder layers'); the plugin finds the pattern of each layer from its index.
    logger.info("converting the output layer %s [%d x %d] at sparsity %g", OUTPUT_LAYER, N, K,
                opts.output_layer_sparsity)
    norm = decoder(model)[1].norm
    norm_dtype = next(norm.parameters()).dtype
    norm.to(device, torch.float32)
    H, count = None, 0
    for i in range(0, len(inputs), opts.batch_size):
        H, count = accumulate_hessian(H, norm(torch.cat(inputs[i:i + opts.batch_size])), count)
    norm.to("cpu", norm_dtype)
    res = solve_layer(head.weight.to(device), H, qcfg.layer_format(), opts.output_layer_sparsity,
                      opts.clip_search)
    head.weight.data = res.weight.to("cpu", head.weight.dtype)
    layers_report.append(_layer_record(OUTPUT_LAYER, res))
    return {f"{OUTPUT_LAYER}.{t}": v.contiguous() for t, v in res.layer.tensors().items()}


def _block_layers(tensors, layers_report, prefix, fmt) -> dict[str, GQSALayer]:
    """The GQSA layers whose full names start with ``prefix``, from their flat tensors."""
    layers = {}
    for r in layers_report:
        if r["name"].startswith(prefix):
            parts = {t: tensors[f"{r['name']}.{t}"] for t in TENSOR_NAMES}
            layers[r["name"]] = GQSALayer.from_tensors(parts, *r["shape"], fmt, r["name"])
    return layers


def _load_layers(block, prefix, layers: dict[str, GQSALayer]) -> None:
    """Make the block named ``prefix`` compute with the stored layers (the next block's inputs come
    from it)."""
    for name, layer in layers.items():
        m = _module(block, name[len(prefix):])
        m.weight.data = dequantize(layer).to(m.weight.device, m.weight.dtype)


def _restore_block(block, prefix, block_file, layers_report, fmt) -> dict[str, torch.Tensor]:
    """Put a block converted by an interrupted run back in place, from its saved tensors."""
    tensors = load_file(block_file)
    _load_layers(block, prefix, _block_layers(tensors, layers_report, prefix, fmt))
    return tensors


def _train_block(block, b, prefix, block_tensors, latents, inputs, targets, kwargs, layers_report, opts,
                 fmt, bqpo_report, bar) -> dict[str, torch.Tensor]:
    """BQPO on block ``b`` (module name ``prefix``) after the solver; returns the block's tensors to
    store."""
    layers = _block_layers(block_tensors, layers_report, prefix, fmt)
    local = {n[len(prefix):]: layer for n, layer in layers.items()}
    trained, record = train_block(block, local, inputs, targets, kwargs, opts.held_out(),
                                  opts.block_training(b), latents, opts.batch_size, desc=f"BQPO block {b}")
    trained = {prefix + n: layer for n, layer in trained.items()}
    _load_layers(block, prefix, trained)
    bqpo_report.append({"block": b, **record})
    bar.set_postfix(bqpo=f"{record['val_loss_start']:.3g}->{record['val_loss_best']:.3g}")
    out = dict(block_tensors)
    for name, layer in trained.items():
        out.update({f"{name}.{t}": v.contiguous() for t, v in layer.tensors().items()})
    return out


def _outlier_ratios(blocks, inputs, block_kwargs, dec_prefix, names, qcfg, device, batch_size,
                    save_dtype) -> list[float | None]:
    """OWL's outlier ratio of each block's converted layers (None: nothing converted), from one
    pass of the dense model's own stream through the blocks."""
    ratios = []
    x = inputs
    for b in tqdm(range(len(blocks)), desc="OWL outlier ratios", unit="block", disable=not show_progress()):
        block = blocks[b].to(device, torch.float32)
        prefix = f"{dec_prefix}.layers.{b}."
        linears = {n: _module(block, n) for g in converted_groups(block, prefix, names, qcfg) for n in g}
        sq = {n: torch.zeros(m.in_features, device=device) for n, m in linears.items()}

        def hook_for(n):
            def hook(_mod, args, _out):
                sq[n] += args[0].reshape(-1, args[0].shape[-1]).float().pow(2).sum(0)
            return hook

        handles = [m.register_forward_hook(hook_for(n)) for n, m in linears.items()]
        try:
            x = _run_block(block, x, block_kwargs[b], batch_size)
        finally:
            for h in handles:
                h.remove()
        ratios.append(outlier_ratio([m.weight for m in linears.values()], list(sq.values()))
                      if linears else None)
        blocks[b] = block.to("cpu", save_dtype)
    return ratios


def _collect_hessians(block, stage, inputs, kwargs, batch_size) -> list[torch.Tensor]:
    """One Hessian per group of the stage, from the input of the group's first module
    (the modules of a group read the same input)."""
    state: list = [(None, 0) for _ in stage]

    def hook_for(i):
        def hook(_mod, args, _out):
            state[i] = accumulate_hessian(state[i][0], args[0], state[i][1])
        return hook

    handles = [_module(block, g[0]).register_forward_hook(hook_for(i)) for i, g in enumerate(stage)]
    try:
        _run_block(block, inputs, kwargs, batch_size)
    finally:
        for h in handles:
            h.remove()
    return [H for H, _ in state]


def _write_checkpoint(model_dir, tmp, config, qcfg, tensors, layers_report, opts, model, seconds,
                      training, tied: bool, block_sparsity: list[float] | None = None) -> dict:
    """``tied``: the dense model's output layer shares the embedding's weight (counted once).
    ``block_sparsity``: each block's sparsity, where OWL chose them."""
    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else \
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(tmp, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in shard})
    if len(shards) > 1:
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": sum(t.numel() * t.element_size()
                                                      for t in tensors.values())},
                       "weight_map": weight_map}, f, indent=2)
    for fname in sorted(os.listdir(model_dir)):
        src = os.path.join(model_dir, fname)
        if os.path.isfile(src) and fname.endswith(COPIED_SUFFIXES) and fname not in NOT_COPIED:
            shutil.copy2(src, os.path.join(tmp, fname))
    out_config = dict(config)
    out_config["quantization_config"] = qcfg.to_dict()
    if OUTPUT_LAYER in qcfg.target_modules:
        # The embedding stays dense; the output layer is GQSA (an image-text model's decoder
        # reads its own text_config).
        out_config["tie_word_embeddings"] = False
        if "text_config" in out_config:
            out_config["text_config"] = {**out_config["text_config"], "tie_word_embeddings": False}
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(out_config, f, indent=2)

    q_weights = sum(r["shape"][0] * r["shape"][1] for r in layers_report)
    q_bytes = sum(tensors[f"{r['name']}.{t}"].numel() * tensors[f"{r['name']}.{t}"].element_size()
                  for r in layers_report for t in ("row_ptr", "col_idx", "qweight", "scales", "qzeros"))
    total_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    dense_bytes = sum(p.numel() * p.element_size() for n, p in model.state_dict().items()
                      if not (n == f"{OUTPUT_LAYER}.weight" and tied))
    kept = sum(r["kept_groups"] for r in layers_report)
    total_groups = q_weights // (qcfg.group_size * qcfg.block_rows)  # a kept group spans R rows
    device = pick_device(opts.device)
    report = {
        "source": os.path.abspath(model_dir),
        "quantization_config": qcfg.to_dict(),
        # Absolute: e2e_checkpoint reads the same text again, maybe from another folder.
        "calibration": {"data": os.path.abspath(opts.calib_data) if opts.calib_data else "random tokens",
                        "n_samples": opts.n_samples, "seq_len": opts.seq_len, "seed": opts.seed},
        "quantized_layers": len(layers_report),
        "quantized_weights": q_weights,
        "kept_group_fraction": kept / max(total_groups, 1),
        "quantized_bytes": q_bytes,
        "bits_per_weight_quantized_layers": 8 * q_bytes / max(q_weights, 1),
        "checkpoint_bytes": total_bytes,
        "dense_bytes": dense_bytes,
        "compression_ratio": dense_bytes / total_bytes,
        "training": training,
        **({"owl": {"lambda": opts.owl_lambda, "block_sparsity": [round(s, 4) for s in block_sparsity]}}
           if block_sparsity else {}),
        **({"mlp_sparsity": opts.mlp_sparsity} if opts.mlp_sparsity is not None else {}),
        "seconds": round(seconds, 1),
        "device": str(device),
        "peak_memory": peak_memory(device),
        "environment": environment(device),
        "layers": layers_report,
    }
    with open(os.path.join(tmp, "README.md"), "w") as f:
        f.write(model_card(report, model_dir))
    with open(os.path.join(tmp, COMPLETE_MARKER), "w") as f:
        json.dump(report, f, indent=2)
    return report


def _publish(tmp: str, out_dir: str) -> None:
    """Move the finished folder into place in one rename, so no half-written checkpoint is visible."""
    out_dir = os.path.abspath(out_dir)
    old = out_dir + ".old"  # the folder replaced (--overwrite); also one left by a run killed here
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(out_dir):
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def describe(report: dict) -> str:
    """The human summary printed at the end of a conversion."""
    q = report["quantization_config"]
    mb = 1 / 2**20
    return "\n".join([
        f"GQSA W{q['bits']} S{q['sparsity'] * 100:.0f}% g{q['group_size']} "
        f"(block_rows {q['block_rows']}{', pattern pairs' if q.get('pattern') == 'pairs' else ''}"
        f"{', OWL lambda %g' % report['owl']['lambda'] if 'owl' in report else ''}"
        f"{', MLP S%g%%' % (report['mlp_sparsity'] * 100) if 'mlp_sparsity' in report else ''}): "
        f"{report['quantized_layers']} layers converted "
        f"in {report['seconds']:.0f} s on {report['device']}",
        f"  kept groups            {report['kept_group_fraction'] * 100:.1f}%",
        f"  quantized layers       {report['quantized_bytes'] * mb:.1f} MiB, "
        f"{report['bits_per_weight_quantized_layers']:.3f} bits per weight (all metadata included)",
        f"  checkpoint             {report['checkpoint_bytes'] * mb:.1f} MiB "
        f"(dense {report['dense_bytes'] * mb:.1f} MiB, {report['compression_ratio']:.2f}x smaller)",
        f"  peak memory            {peak_text(report.get('peak_memory', {}))}",
    ])
