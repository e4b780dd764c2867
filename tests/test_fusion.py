# SPDX-License-Identifier: Apache-2.0
"""The split-norm pass (vllm_gqsa/fusion.py), run by the real torch compiler on the CPU over
vLLM's own norm IR op: it rewrites exactly the norms between two sliced GQSA layers, only in
graphs for the batches the sliced GEMV serves, and the compiled result matches the uncompiled one.
(tests/test_cuda_kernels.py checks the kernels on the GPU.)"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from vllm_gqsa import fusion, reference
from vllm_gqsa.format import LayerFormat
from vllm_gqsa.kernels.cuda_format import to_kernel_format
from vllm_gqsa.random_layers import random_gqsa_layer

ir = pytest.importorskip("vllm.ir.ops", reason="vLLM without IR ops lowers its norms before the pass runs")

K = 64  # the hidden size: o's outputs, gate/up's inputs
EPS = 1e-6


@pytest.fixture(scope="module")
def layers():
    def kernel(N, Kin, layout, seed):
        t = to_kernel_format(random_gqsa_layer(N, Kin, LayerFormat(4, 16, 1), 0.5, seed=seed), 4, layout=layout)
        if "sell_warps" in t:  # a list, as the plugin keeps it (tolist in a graph would break it)
            t["warps"] = t.pop("sell_warps").tolist()
        return t

    return {"o": kernel(K, 48, "sliced", 1), "gate_up": kernel(96, K, "sliced", 2),
            "o_rows": kernel(K, 48, "rows", 1), "gate_up_rows": kernel(96, K, "rows", 2)}


def gqsa(t, x):
    N = t["row_ptr"].numel() - 1
    return torch.ops.vllm_gqsa.gqsa_mm(x, t["row_ptr"], t["codes"], t["meta"], t["schedule"], t["chunks"], N, 16,
                                       None, t["counters"], False, t.get("sell_rows"), t.get("slice_parts"),
                                       t.get("warps"))


def block(ls, a, r, w, o="o", up="gate_up", **kw):  # as vLLM's Llama: o, add + norm, gate/up
    h, r = ir.fused_add_rms_norm(gqsa(ls[o], a), r, w, EPS, **kw)
    return gqsa(ls[up], h.reshape(-1, K)), r


def decoder_block(ls, a, r, w):
    return block(ls, a, r, w)


def residual_unused(ls, a, r, w):
    return block(ls, a, r, w)[0], a


def o_used_twice(ls, a, r, w):
    y = gqsa(ls["o"], a)
    h, r = ir.fused_add_rms_norm(y, r, w, EPS)
    return gqsa(ls["gate_up"], h) + y.sum(), r


def normed_used_twice(ls, a, r, w):
    h, r = ir.fused_add_rms_norm(gqsa(ls["o"], a), r, w, EPS)
    return gqsa(ls["gate_up"], h) + h.sum(), r


def rows_before(ls, a, r, w):  # only the sliced GEMV adds the residual in its epilogue
    return block(ls, a, r, w, o="o_rows")


def rows_after(ls, a, r, w):
    return block(ls, a, r, w, up="gate_up_rows")


def op_between(ls, a, r, w):  # as tensor parallelism's all-reduce of o's partial sums: h is not o's output
    h, r = ir.fused_add_rms_norm(gqsa(ls["o"], a) * 2, r, w, EPS)
    return gqsa(ls["gate_up"], h), r


def part_of_the_norm(ls, a, r, w):  # variance over part of the channels: not the kernels' norm
    return block(ls, a, r, w, variance_size=K // 2)


CASES = {f.__name__: (f, n) for f, n in [
    (decoder_block, 1), (residual_unused, 1), (o_used_twice, 0), (normed_used_twice, 0), (rows_before, 0),
    (rows_after, 0), (op_between, 0), (part_of_the_norm, 0)]}


def compile_and_count(fn, layers, a, r, w, compile_range=None):
    """fn compiled with the pass (inside vLLM's pass context for compile_range, if given): its
    result and how many norms the pass split."""
    from vllm.compilation.passes.inductor_pass import pass_context
    from vllm.config.utils import Range

    torch._dynamo.reset()
    before = fusion.fused_total
    ctx = pass_context(Range(*compile_range)) if compile_range else contextlib.nullcontext()
    with ctx, torch._inductor.config.patch(post_grad_custom_post_pass=fusion.GQSAFusionPass(),
                                           force_disable_caches=True):
        # The weight a constant of the graph, as a module's parameter is in vLLM's graphs.
        out = torch.compile(lambda a, r: fn(layers, a, r, w), dynamic=False)(a, r)
    return out, fusion.fused_total - before


def inputs(dtype, weight="x_dtype"):
    g = torch.Generator().manual_seed(0)
    a, r = (torch.randn(2, 48, generator=g) * 3).to(dtype), (torch.randn(2, K, generator=g) * 3).to(dtype)
    w = torch.rand(K, generator=g) + 0.5
    return a, r, {"x_dtype": w.to(dtype), "fp32": w, "none": None}[weight]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_pass_splits_only_a_norm_between_two_sliced_layers(layers, case, dtype):
    fn, expect = CASES[case]
    a, r, w = inputs(dtype)
    compiled, split = compile_and_count(fn, layers, a, r, w)
    assert split == expect
    eager = fn(layers, a, r, w)
    assert torch.equal(compiled[1], eager[1])  # the new residual: one fp32 add, rounded once
    # The split norm rounds h * weight * r once where vLLM rounds h * r first: a unit in the last
    # place of an activation, before the GEMV.
    torch.testing.assert_close(compiled[0], eager[0], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("compile_range, expect", [((1, 1), 1), ((1, 2), 0), ((4, 8192), 0), ((1, 8192), 0)])
def test_pass_only_in_the_graph_for_one_token(layers, compile_range, expect):
    a, r, w = inputs(torch.float16)
    assert compile_and_count(decoder_block, layers, a, r, w, compile_range)[1] == expect


@pytest.mark.parametrize("compile_range, expect", [((1, 1), 1), ((1, 3), 1), ((1, 4), 0), ((4, 8192), 0)])
def test_pass_in_the_wider_range(layers, monkeypatch, compile_range, expect):
    monkeypatch.setenv(fusion.TOKENS_ENV, "3")
    a, r, w = inputs(torch.float16)
    assert compile_and_count(decoder_block, layers, a, r, w, compile_range)[1] == expect


@pytest.mark.parametrize("weight", ["x_dtype", "fp32", "none"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_split_ops_without_the_kernels(layers, dtype, weight):
    """On the CPU the two ops are the reference math: the new residual has vLLM's bits, and the
    output is the GEMV of the normalized input up to one rounding."""
    o, up = layers["o"], layers["gate_up"]
    a, r, w = inputs(dtype, weight)
    args = lambda t: (t["row_ptr"], t["codes"], t["meta"], t["schedule"], t["chunks"], t["row_ptr"].numel() - 1, 16,  # noqa: E731
                      None, t["counters"], False, t["sell_rows"], t["slice_parts"], t["warps"])
    new_residual, g, stats = torch.ops.vllm_gqsa.gqsa_mm_add_norm_stats(a, r, w, *args(o))
    assert stats.shape == (2, o["schedule"].shape[0])
    y = torch.ops.vllm_gqsa.gqsa_stats_norm_mm(g, stats, EPS, new_residual, w, *args(up))
    normed, residual = reference.rms_norm(gqsa(o, a), r, w, EPS)
    assert torch.equal(new_residual, residual)
    h = gqsa(o, a).float() + r.float()  # fp32, before the new residual's rounding
    assert torch.equal(g, (h * w.float() if w is not None else h).to(dtype))
    torch.testing.assert_close(stats.sum(-1), h.pow(2).sum(-1), rtol=1e-5, atol=0)
    torch.testing.assert_close(y, gqsa(up, normed), rtol=2e-2, atol=2e-2)


def test_split_marks_a_g_too_large_for_the_gemv(layers):
    """A token whose h * weight exceeds fp16's range gets a negative sum (-1 - the sum), which
    sends the second half to the normalized h; the other token keeps its plain sum."""
    o, up = layers["o"], layers["gate_up"]
    a, r, _ = inputs(torch.float16)
    r[1, 3] = 60000.0
    w = torch.full((r.shape[-1],), 2.0, dtype=torch.float16)
    args = lambda t: (t["row_ptr"], t["codes"], t["meta"], t["schedule"], t["chunks"], t["row_ptr"].numel() - 1, 16,  # noqa: E731
                      None, t["counters"], False, t["sell_rows"], t["slice_parts"], t["warps"])
    new_residual, g, stats = torch.ops.vllm_gqsa.gqsa_mm_add_norm_stats(a, r, w, *args(o))
    h = new_residual.float()
    assert stats[:, 1:].eq(0).all()
    torch.testing.assert_close(stats[0, 0], h[0].pow(2).sum(), rtol=1e-3, atol=0)
    torch.testing.assert_close(stats[1, 0], -1 - h[1].pow(2).sum(), rtol=1e-3, atol=0)
    y = torch.ops.vllm_gqsa.gqsa_stats_norm_mm(g, stats, EPS, new_residual, w, *args(up))
    assert torch.equal(y, gqsa(up, reference.rms_norm(new_residual, None, w, EPS)[0]))


@pytest.mark.parametrize("weight", ["x_dtype", "fp32", "none"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_norm_is_vllms(dtype, weight):
    """reference.rms_norm, which the kernels are tested against, is the math of vLLM's IR ops."""
    from vllm.ir.ops.layernorm import fused_add_rms_norm, rms_norm

    g = torch.Generator().manual_seed(1)
    x, r = (torch.randn(5, 96, generator=g) * 3).to(dtype), (torch.randn(5, 96, generator=g) * 3).to(dtype)
    w = {"x_dtype": torch.rand(96, generator=g).to(dtype), "fp32": torch.rand(96, generator=g) + 1,
         "none": None}[weight]
    ours, our_residual = reference.rms_norm(x, r, w, EPS)
    theirs, their_residual = fused_add_rms_norm.impls["native"].impl_fn(x, r, w, EPS)
    assert torch.equal(ours, theirs) and torch.equal(our_residual, their_residual)
    assert torch.equal(reference.rms_norm(x, None, w, EPS)[0], rms_norm.impls["native"].impl_fn(x, w, EPS))


def test_pass_is_one_vllm_takes():
    from vllm.compilation.passes.inductor_pass import InductorPass

    p = fusion.GQSAFusionPass()
    assert isinstance(p, InductorPass)  # vLLM's pass manager adds only these
    assert copy.deepcopy(p) is p  # vLLM deep-copies its inductor config
    assert p.uuid() == fusion.GQSAFusionPass().uuid()  # a stable key for the compile cache


def test_pass_key_follows_its_settings(monkeypatch):
    """A graph compiled with SiLU-and-mul fused is not taken from vLLM's cache for a process that
    turned it off (or the other way round)."""
    key = fusion.GQSAFusionPass().uuid()
    monkeypatch.setenv(fusion.SILU_MUL_ENV, "0")
    assert fusion.GQSAFusionPass().uuid() != key


@pytest.mark.parametrize("mode, split, silu_mul, taken, endpoints", [
    ("VLLM_COMPILE", None, None, False, [1, 32, 2048]),  # one token, and 2 to 32, get graphs of their own
    ("NONE", None, None, False, None),                   # --enforce-eager: nothing compiles
    ("VLLM_COMPILE", "0", None, False, [1, 32, 2048]),   # VLLM_GQSA_SPLIT_NORM=0
    ("VLLM_COMPILE", None, "0", False, [1, 2048]),       # VLLM_GQSA_FUSE_SILU_MUL=0
    ("VLLM_COMPILE", "0", "0", False, None),
    ("VLLM_COMPILE", None, None, True, None),            # a user's own post-grad pass is left alone
])
def test_install(monkeypatch, mode, split, silu_mul, taken, endpoints):
    from vllm.config import CompilationConfig, CompilationMode, VllmConfig, set_current_vllm_config
    from vllm_cpu import setup_cpu_vllm

    setup_cpu_vllm()
    installed = endpoints is not None
    for env, value in ((fusion.ENV, split), (fusion.SILU_MUL_ENV, silu_mul)):
        if value is not None:
            monkeypatch.setenv(env, value)
    config = VllmConfig(compilation_config=CompilationConfig())
    config.compilation_config.mode = getattr(CompilationMode, mode)  # (the CPU platform picks another)
    config.compilation_config.compile_ranges_endpoints = [2048]

    class Theirs(fusion._Base):
        def __call__(self, graph):
            pass

    theirs = Theirs()
    if taken:
        config.compilation_config.inductor_compile_config[fusion.PASS_KEY] = theirs
    with set_current_vllm_config(config):
        assert fusion.install() is installed
        assert fusion.install() is installed  # once per model, however many layers ask
    current = config.compilation_config.inductor_compile_config.get(fusion.PASS_KEY)
    assert isinstance(current, fusion.GQSAFusionPass) is installed
    assert config.compilation_config.compile_ranges_endpoints == (endpoints if installed else [2048])
    if taken:
        assert current is theirs


@pytest.mark.parametrize("value, endpoints", [("1", [1]), ("2", [1, 2]), ("3", [1, 3]), ("8", [1, 3])])
def test_install_wider_range(monkeypatch, value, endpoints):
    """VLLM_GQSA_SPLIT_NORM_TOKENS sets the split's compile range, never past the GEMV's batches."""
    from vllm.config import CompilationConfig, CompilationMode, VllmConfig, set_current_vllm_config
    from vllm_cpu import setup_cpu_vllm

    setup_cpu_vllm()
    monkeypatch.setenv(fusion.TOKENS_ENV, value)
    config = VllmConfig(compilation_config=CompilationConfig())
    config.compilation_config.mode = CompilationMode.VLLM_COMPILE
    config.compilation_config.compile_ranges_endpoints = [2048]
    with set_current_vllm_config(config):
        assert fusion.install()
    assert config.compilation_config.compile_ranges_endpoints == [*endpoints, 32, 2048]


@pytest.mark.parametrize("value", ["0", "-1", "two", ""])
def test_split_tokens_must_be_a_count(monkeypatch, value):
    monkeypatch.setenv(fusion.TOKENS_ENV, value)
    with pytest.raises(ValueError, match=fusion.TOKENS_ENV):
        fusion._split_max_tokens()


# SiLU-and-mul done by the gate/up layer (fusion.fuse_silu_mul): vLLM's SiluAndMul traced after a
# gate/up layer in the pair pattern.
D = 48  # gate/up's outputs per half


@pytest.fixture(scope="module")
def gate_up():
    fmt = LayerFormat(4, 16, 1)
    return {"pairs": to_kernel_format(random_gqsa_layer(2 * D, K, fmt, 0.5, seed=3, pairs=True), 4, layout="rows"),
            "groups": to_kernel_format(random_gqsa_layer(2 * D, K, fmt, 0.5, seed=3), 4, layout="rows")}


def gate_up_mm(t, x, pairs=True):
    return torch.ops.vllm_gqsa.gqsa_mm(x, t["row_ptr"], t["codes"], t["meta"], t["schedule"], t["chunks"], 2 * D, 16,
                                       None, t["counters"], pairs)


def silu_and_mul(y):
    from vllm.model_executor.layers.activation import SiluAndMul

    return SiluAndMul.forward_native(y)


def mlp(ls, x):  # as vLLM's LlamaMLP between gate/up and down
    return silu_and_mul(gate_up_mm(ls["pairs"], x))


def through_a_view(ls, x):
    return silu_and_mul(gate_up_mm(ls["pairs"], x).reshape(-1, 2 * D))


def sigmoid_form(ls, x):
    y = gate_up_mm(ls["pairs"], x)
    g = y[..., :D].float()
    return (g * torch.sigmoid(g)).to(y.dtype) * y[..., D:]


def not_pairs(ls, x):  # the tensor-core kernel does not fuse it
    return silu_and_mul(gate_up_mm(ls["groups"], x, pairs=False))


def output_used_twice(ls, x):
    y = gate_up_mm(ls["pairs"], x)
    return silu_and_mul(y) + y.sum()


def halves_swapped(ls, x):
    y = gate_up_mm(ls["pairs"], x)
    return torch.nn.functional.silu(y[..., D:]) * y[..., :D]


def other_activation(ls, x):
    y = gate_up_mm(ls["pairs"], x)
    return torch.nn.functional.gelu(y[..., :D]) * y[..., D:]


def sum_not_product(ls, x):
    y = gate_up_mm(ls["pairs"], x)
    return torch.nn.functional.silu(y[..., :D]) + y[..., D:]


def uneven_halves(ls, x):
    y = gate_up_mm(ls["pairs"], x)
    return torch.nn.functional.silu(y[..., :D - 16]) * y[..., D - 16:-32]


SILU_CASES = {f.__name__: (f, n) for f, n in [
    (mlp, 1), (through_a_view, 1), (sigmoid_form, 1), (not_pairs, 0), (output_used_twice, 0), (halves_swapped, 0),
    (other_activation, 0), (sum_not_product, 0), (uneven_halves, 0)]}


def compile_and_count_silu(fn, ls, x, compile_range=None):
    from vllm.compilation.passes.inductor_pass import pass_context
    from vllm.config.utils import Range

    torch._dynamo.reset()
    before = fusion.silu_mul_total
    ctx = pass_context(Range(*compile_range)) if compile_range else contextlib.nullcontext()
    with ctx, torch._inductor.config.patch(post_grad_custom_post_pass=fusion.GQSAFusionPass(),
                                           force_disable_caches=True):
        out = torch.compile(lambda x: fn(ls, x), dynamic=False)(x)
    return out, fusion.silu_mul_total - before


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", SILU_CASES)
def test_pass_fuses_only_silu_and_mul_after_a_pair_gate_up(gate_up, case, dtype):
    fn, expect = SILU_CASES[case]
    x = (torch.randn(5, K, generator=torch.Generator().manual_seed(4)) * 3).to(dtype)
    compiled, fused = compile_and_count_silu(fn, gate_up, x)
    assert fused == expect
    # Inductor's own SiLU-and-mul may skip the rounding of silu(g) before the product: one unit in
    # the last place.
    torch.testing.assert_close(compiled, fn(gate_up, x), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("compile_range, env, expect", [
    ((2, 32), None, 1), ((2, 8), None, 1), ((1, 1), None, 0), ((2, 2048), None, 0), ((33, 2048), None, 0),
    ((2, 32), "0", 0)])
def test_silu_mul_pass_only_in_its_range(gate_up, monkeypatch, compile_range, env, expect):
    if env is not None:
        monkeypatch.setenv(fusion.SILU_MUL_ENV, env)
    x = torch.randn(5, K, dtype=torch.float16)
    assert compile_and_count_silu(mlp, gate_up, x, compile_range)[1] == expect


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_silu_mul_op_without_the_kernels(gate_up, dtype):
    """On the CPU the fused op is gqsa_mm, then vLLM's SiLU-and-mul, bit for bit."""
    t = gate_up["pairs"]
    x = (torch.randn(3, K, generator=torch.Generator().manual_seed(5)) * 3).to(dtype)
    y = torch.ops.vllm_gqsa.gqsa_mm_silu_mul(x, t["row_ptr"], t["codes"], t["meta"], t["schedule"], t["chunks"],
                                             2 * D, 16, None, t["counters"], True)
    assert y.shape == (3, D)
    assert torch.equal(y, silu_and_mul(gate_up_mm(t, x)))
    assert torch.equal(reference.silu_and_mul(gate_up_mm(t, x)), silu_and_mul(gate_up_mm(t, x)))


def test_silu_mul_op_opcheck(gate_up):
    """The op's schema, fake (meta) function and dispatch agree, as torch.compile relies on."""
    t = gate_up["pairs"]
    x = torch.randn(3, K, dtype=torch.float16)
    torch.library.opcheck(torch.ops.vllm_gqsa.gqsa_mm_silu_mul,
                          (x, t["row_ptr"], t["codes"], t["meta"], t["schedule"], t["chunks"], 2 * D, 16, None,
                           t["counters"], True))


# The norm split between pair layers (fusion.split_norms(graph, "pairs")), in the graph for 2 to 32
# tokens: o -> norm -> gate/up (whose SiLU-and-mul the other rewrite fused first), or down -> norm
# -> the next q/k/v.

@pytest.fixture
def pairs_split_on(monkeypatch):
    monkeypatch.setenv(fusion.PAIRS_ENV, "1")


@pytest.fixture(scope="module")
def pair_layers(gate_up):
    fmt = LayerFormat(4, 16, 1)
    pairs = lambda N, seed: to_kernel_format(random_gqsa_layer(N, K, fmt, 0.5, seed=seed, pairs=True), 4,  # noqa: E731
                                             layout="rows")
    return {"o": pairs(K, 6), "qkv": pairs(80, 7), "gate_up": gate_up["pairs"], "gate_up_groups": gate_up["groups"],
            "gate_up_k": pairs(2 * K, 9), "down": pairs(K, 10)}


def pair_mm(t, x, pairs=True):
    N = t["row_ptr"].numel() - 1
    return torch.ops.vllm_gqsa.gqsa_mm(x, t["row_ptr"], t["codes"], t["meta"], t["schedule"], t["chunks"], N, 16,
                                       None, t["counters"], pairs)


def pair_attention_block(ls, a, r, w):  # o, add + norm, gate/up, SiLU-and-mul
    h, r = ir.fused_add_rms_norm(pair_mm(ls["o"], a), r, w, EPS)
    return silu_and_mul(pair_mm(ls["gate_up"], h)), r


def pair_mlp_block(ls, a, r, w):  # down, add + norm, the next layer's q/k/v
    h, r = ir.fused_add_rms_norm(pair_mm(ls["o"], a), r, w, EPS)
    return pair_mm(ls["qkv"], h), r


def pair_then_groups(ls, a, r, w):  # the layer after is no pair layer: vLLM's norm stays
    h, r = ir.fused_add_rms_norm(pair_mm(ls["o"], a), r, w, EPS)
    return pair_mm(ls["gate_up_groups"], h, pairs=False), r


def pair_decoder_layer(ls, a, r, w):  # o, norm, gate/up + SiLU-and-mul, down, norm, the next q/k/v
    h, r = ir.fused_add_rms_norm(pair_mm(ls["o"], a), r, w, EPS)
    act = silu_and_mul(pair_mm(ls["gate_up_k"], h))
    h, r = ir.fused_add_rms_norm(pair_mm(ls["down"], act), r, w, EPS)
    return pair_mm(ls["qkv"], h), r


PAIR_CASES = {f.__name__: (f, n) for f, n in [
    (pair_attention_block, 1), (pair_mlp_block, 1), (pair_then_groups, 0), (pair_decoder_layer, 2)]}


def pair_inputs(dtype, weight="x_dtype", M=5):
    g = torch.Generator().manual_seed(8)
    a, r = (torch.randn(M, K, generator=g) * 3).to(dtype), (torch.randn(M, K, generator=g) * 3).to(dtype)
    w = torch.rand(K, generator=g) + 0.5
    return a, r, {"x_dtype": w.to(dtype), "fp32": w, "none": None}[weight]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", PAIR_CASES)
def test_pass_splits_a_norm_between_two_pair_layers(pair_layers, pairs_split_on, case, dtype):
    fn, expect = PAIR_CASES[case]
    a, r, w = pair_inputs(dtype)
    compiled, split = compile_and_count(fn, pair_layers, a, r, w, (2, 32))
    assert split == expect
    eager = fn(pair_layers, a, r, w)
    if expect < 2:
        assert torch.equal(compiled[1], eager[1])
    else:  # the second residual adds down's output, whose input went through the first split
        torch.testing.assert_close(compiled[1], eager[1], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(compiled[0], eager[0], rtol=2e-2, atol=2e-2)


def test_pair_split_keeps_the_silu_mul_fusion(pair_layers, pairs_split_on):
    """o -> norm -> gate/up -> SiLU-and-mul becomes two ops: the second is the split's second half
    with the SiLU-and-mul in it (its output has gate/up's half width)."""
    from vllm.compilation.passes.inductor_pass import pass_context
    from vllm.config.utils import Range

    a, r, w = pair_inputs(torch.float16)
    seen = []

    class Spy(fusion.GQSAFusionPass):
        def __call__(self, graph):
            super().__call__(graph)
            seen.extend(n.target for n in graph.nodes if n.op == "call_function")

    torch._dynamo.reset()
    with pass_context(Range(2, 32)), torch._inductor.config.patch(post_grad_custom_post_pass=Spy(),
                                                                  force_disable_caches=True):
        torch.compile(lambda a, r: pair_attention_block(pair_layers, a, r, w), dynamic=False)(a, r)
    ops = torch.ops.vllm_gqsa
    assert seen.count(ops.gqsa_mm_add_norm_stats.default) == 1 and seen.count(ops.gqsa_stats_norm_mm.default) == 1
    assert not {ops.gqsa_mm.default, ops.gqsa_mm_silu_mul.default} & set(seen)


@pytest.mark.parametrize("compile_range, env, expect", [
    ((2, 32), {}, 1), ((2, 8), {}, 1), ((1, 1), {}, 0), ((2, 2048), {}, 0), ((33, 2048), {}, 0),
    ((2, 32), {fusion.ENV: "0"}, 0), ((2, 32), {fusion.PAIRS_ENV: "0"}, 0)])
def test_pair_split_only_in_its_range(pair_layers, pairs_split_on, monkeypatch, compile_range, env, expect):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    a, r, w = pair_inputs(torch.float16)
    assert compile_and_count(pair_mlp_block, pair_layers, a, r, w, compile_range)[1] == expect


@pytest.mark.parametrize("silu_mul", [False, True])
@pytest.mark.parametrize("weight", ["x_dtype", "fp32", "none"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pair_split_ops_without_the_kernels(pair_layers, dtype, weight, silu_mul):
    """On the CPU: a sum per token and 32 rows' worth of columns (the kernel's shape), the sum in
    the first; the second half is the layer (and SiLU-and-mul) of the normalized input."""
    o, up = pair_layers["o"], pair_layers["gate_up" if silu_mul else "qkv"]
    a, r, w = pair_inputs(dtype, weight, M=3)
    args = lambda t: (t["row_ptr"], t["codes"], t["meta"], t["schedule"], t["chunks"], t["row_ptr"].numel() - 1, 16,  # noqa: E731
                      None, t["counters"], True)
    new_residual, g, stats = torch.ops.vllm_gqsa.gqsa_mm_add_norm_stats(a, r, w, *args(o))
    assert stats.shape == (3, K // 32) and stats[:, 1:].eq(0).all()
    h = pair_mm(o, a).float() + r.float()
    torch.testing.assert_close(stats.sum(-1), h.pow(2).sum(-1), rtol=1e-5, atol=0)
    y = torch.ops.vllm_gqsa.gqsa_stats_norm_mm(g, stats, EPS, new_residual, w, *args(up), None, None, None, silu_mul)
    assert torch.equal(new_residual, reference.rms_norm(pair_mm(o, a), r, w, EPS)[1])
    expected = pair_mm(up, reference.rms_norm(new_residual, None, w, EPS)[0])
    assert torch.equal(y, reference.silu_and_mul(expected) if silu_mul else expected)


def test_pair_split_ops_opcheck(pair_layers):
    o, up = pair_layers["o"], pair_layers["gate_up"]
    a, r, w = pair_inputs(torch.float16, M=3)
    args = lambda t: (t["row_ptr"], t["codes"], t["meta"], t["schedule"], t["chunks"], t["row_ptr"].numel() - 1, 16,  # noqa: E731
                      None, t["counters"], True)
    torch.library.opcheck(torch.ops.vllm_gqsa.gqsa_mm_add_norm_stats, (a, r, w, *args(o)))
    new_residual, g, stats = torch.ops.vllm_gqsa.gqsa_mm_add_norm_stats(a, r, w, *args(o))
    torch.library.opcheck(torch.ops.vllm_gqsa.gqsa_stats_norm_mm,
                          (g, stats, EPS, new_residual, w, *args(up), None, None, None, True))


def test_pair_split_is_off_by_default(pair_layers, monkeypatch):
    """The pair layers' split (not faster at 16 tokens or more) waits for VLLM_GQSA_SPLIT_NORM_PAIRS=1:
    no rewrite, and no compile range of its own."""
    from vllm.config import CompilationConfig, CompilationMode, VllmConfig, set_current_vllm_config
    from vllm_cpu import setup_cpu_vllm

    monkeypatch.delenv(fusion.PAIRS_ENV, raising=False)
    a, r, w = pair_inputs(torch.float16)
    assert compile_and_count(pair_mlp_block, pair_layers, a, r, w, (2, 32))[1] == 0
    setup_cpu_vllm()
    monkeypatch.setenv(fusion.SILU_MUL_ENV, "0")
    for on, endpoints in ((False, [1, 2048]), (True, [1, 32, 2048])):
        monkeypatch.setenv(fusion.PAIRS_ENV, "1" if on else "0")
        config = VllmConfig(compilation_config=CompilationConfig())
        config.compilation_config.mode = CompilationMode.VLLM_COMPILE
        config.compilation_config.compile_ranges_endpoints = [2048]
        with set_current_vllm_config(config):
            assert fusion.install()
        assert config.compilation_config.compile_ranges_endpoints == endpoints
