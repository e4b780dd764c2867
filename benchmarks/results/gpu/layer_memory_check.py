# SPDX-License-Identifier: Apache-2.0
# GPU memory held by GQSA layers of the Llama-3-8B shape, built as the plugin builds them for
# --load-format dummy: bytes of the tensors kept against torch.cuda.memory_allocated (what vLLM's
# "Model loading took" reports), per layout and build path. "plugin" builds each layer as the
# plugin does; "clone" frees and releases the layer's temporaries and keeps fresh copies.
#   python benchmarks/results/gpu/layer_memory_check.py rows|sliced plugin|clone OUT.json
import json
import sys
import time

import torch

from vllm_gqsa.format import GQSALayer, LayerFormat
from vllm_gqsa.random_layers import random_gqsa_layer
from vllm_gqsa.kernels.cuda_format import to_kernel_format, pair_pattern

layout, path, out = sys.argv[1], sys.argv[2], sys.argv[3]
dev = torch.device("cuda")
fmt = LayerFormat(bits=4, group_size=16, block_rows=1)
SHAPES = [[(4096, 4096), (1024, 4096), (1024, 4096)], [(4096, 4096)], [(14336, 4096), (14336, 4096)], [(4096, 14336)]]
torch.cuda.empty_cache()
base = torch.cuda.memory_allocated()
kept, nbytes, t0 = [], 0, time.time()
for _ in range(32):  # decoder layers
    for shards in SHAPES:
        parts = [random_gqsa_layer(N, K, fmt, 0.5, seed=i, device=dev) for i, (N, K) in enumerate(shards)]
        merged = GQSALayer.concat_rows(parts)
        single = merged.single_rows()
        pairs = pair_pattern(single.row_ptr, single.col_idx, single.in_features, 16)
        t = to_kernel_format(single, num_ctas=264, layout=layout, num_sms=132, pairs=pairs)
        t.pop("sell_warps", None)
        if path == "clone":  # this layer's temporaries freed and released before the kept copies
            del parts, merged, single
            torch.cuda.empty_cache()
            t = {k: v.clone() for k, v in t.items()}
        kept.append(t)
        parts = merged = single = None
        nbytes += sum(v.numel() * v.element_size() for v in t.values())
torch.cuda.synchronize()
torch.cuda.empty_cache()
alloc = torch.cuda.memory_allocated() - base
r = {"layout": layout, "path": path, "tensor_GiB": nbytes / 2**30, "allocated_GiB": alloc / 2**30,
     "reserved_GiB": torch.cuda.memory_reserved() / 2**30, "seconds": time.time() - t0,
     "tensors": sum(len(t) for t in kept), "device": torch.cuda.get_device_name()}
print(json.dumps(r))
json.dump(r, open(out, "w"), indent=1)
