# SPDX-License-Identifier: Apache-2.0
"""torch.compile rewrites around GQSA layers: an RMSNorm split between the two layers around it (sliced
GEMVs at one token, pair layers' sparse-tensor-core kernels at 2 to 32), and SiLU-and-mul done by
the gate/up layer's kernel (2 to 32 tokens).

**SiLU-and-mul.** vLLM's Llama-style MLP runs gate/up, then ``SiluAndMul`` (``silu(y[..., :d]) *
y[..., d:]``), then down. For a gate/up layer in the pair pattern the pass replaces ``gqsa_mm`` and
the SiLU-and-mul traced after it (slices, silu in one of its decomposed forms, mul) with
``gqsa_mm_silu_mul``: each CTA of the sparse-tensor-core kernel computes a gate row tile and its
up rows together and writes silu(gate) * up, so the [M, 2d] output is never written or read back
and the activation is no kernel of its own. It runs in the graph vLLM compiles for 2 to 32 tokens
(``install`` adds that range), the batches that kernel serves; ``VLLM_GQSA_FUSE_SILU_MUL=0`` turns
it off.

**RMSNorm.** In a Llama-style decoder layer, vLLM's ``fused_add_rms_norm`` (the residual add and the norm)
sits between two linear layers: o and gate/up, and down and the next layer's q/k/v. At one token
it is a kernel of its own, about 2 us plus a launch gap. Both linear layers are sliced GEMVs, so:
  - the first (``gqsa_mm_add_norm_stats``) adds the residual to its outputs in its epilogue and
    writes, besides the new residual, g = h * weight and each CTA's sum of h^2;
  - the second (``gqsa_stats_norm_mm``) reads g as a plain GEMV reads x, sums those sums in every
    CTA, and scales its outputs by the norm's factor, one number per token.
The norm is then no kernel at all, and no CTA repeats a reduction over x.

The pass finds ``gqsa_mm`` (sliced) -> ``vllm_ir.fused_add_rms_norm`` -> ``gqsa_mm`` (sliced),
each the only use of the one before, and rewrites the three into the two ops above. It runs as
vLLM's ``post_grad_custom_post_pass``, before vLLM lowers its IR ops, and only in a graph compiled
for one token: ``install`` adds that range to vLLM's compile ranges (vLLM then compiles the
one-token graph for its static shape), so larger batches keep vLLM's own norm kernel. At 2 and 3
tokens, which the sliced GEMV also serves, the split was slower on an H100 for o -> gate/up (33
against 29 us at 2 tokens, benchmarks/results/gpu/norm_split_v4_h100.json);
``VLLM_GQSA_SPLIT_NORM_TOKENS=n`` widens the range to 1 to n tokens (at most the GEMV's). It does
nothing with ``--enforce-eager`` or ``VLLM_GQSA_SPLIT_NORM=0``.

With ``VLLM_GQSA_SPLIT_NORM_PAIRS=1``, layers in the pair pattern get the same split at 2 to 32
tokens, in the graph of that range, from their sparse-tensor-core kernel (``sp_kernel``): the first
layer's finish writes a sum of h^2 per token and 32 rows, and every CTA of the second sums them
before its main loop and scales its outputs (gate and up, before a fused SiLU-and-mul) in its
finish. The second layer may be a ``gqsa_mm_silu_mul``: the SiLU-and-mul rewrite runs first. It is
off by default: on an H100 it made decoder layers faster at 2 tokens, no faster at 16 and slower
at 32 (csrc/README.md).

Both run in one pass, vLLM's ``post_grad_custom_post_pass``, each in its own compile range.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import operator
import os
import sys

import torch
from torch import fx

from . import ops  # noqa: F401  (registers torch.ops.vllm_gqsa)

logger = logging.getLogger("vllm.gqsa")  # under "vllm." so that vLLM's logging prints it
fused_total = 0  # norms split in this process, over every compiled graph
silu_mul_total = 0  # SiLU-and-muls fused into gate/up layers, the same way

ENV = "VLLM_GQSA_SPLIT_NORM"
TOKENS_ENV = "VLLM_GQSA_SPLIT_NORM_TOKENS"
PAIRS_ENV = "VLLM_GQSA_SPLIT_NORM_PAIRS"
SILU_MUL_ENV = "VLLM_GQSA_FUSE_SILU_MUL"
PASS_KEY = "post_grad_custom_post_pass"

_VIEWS = (torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default)


def _inductor_pass_base():
    """vLLM's InductorPass (its post-grad pass manager takes only those), or None."""
    for module in ("vllm.compilation.passes.inductor_pass", "vllm.compilation.inductor_pass"):
        with contextlib.suppress(ImportError):
            return __import__(module, fromlist=["InductorPass"]).InductorPass
    return None


def _gemv_max_tokens() -> int:
    from .kernels import cuda

    return cuda.dispatch(False, False)[0]


def _split_max_tokens() -> int:
    """The largest batch whose compiled graph gets the split: 1, or VLLM_GQSA_SPLIT_NORM_TOKENS
    up to the sliced GEMV's limit."""
    value = os.environ.get(TOKENS_ENV)
    if value is None:
        return 1
    try:
        tokens = int(value)
    except ValueError:
        tokens = 0
    if tokens < 1:
        raise ValueError(f"{TOKENS_ENV} must be a whole number of tokens, 1 or more; got {value!r}")
    return min(tokens, _gemv_max_tokens())


def _is_add_norm(node: fx.Node) -> bool:
    target = node.target if node.op == "call_function" else None
    return (isinstance(target, torch._ops.OpOverload) and target.namespace == "vllm_ir"
            and target._opname == "fused_add_rms_norm")


def _is_sliced_mm(node: fx.Node) -> bool:
    return node.target is torch.ops.vllm_gqsa.gqsa_mm.default and _call_args(node).get("sell_rows") is not None


def _is_pair_mm(node: fx.Node, silu_mul: bool = False) -> bool:
    """A ``gqsa_mm`` (or with silu_mul also a ``gqsa_mm_silu_mul``) of a pair layer in the row layout."""
    ops_ = torch.ops.vllm_gqsa
    if node.target is not ops_.gqsa_mm.default and not (silu_mul and node.target is ops_.gqsa_mm_silu_mul.default):
        return False
    args = _call_args(node)
    return bool(args.get("pairs")) and args.get("sell_rows") is None and args.get("xcols") is None


# The layers around a norm that each range's split takes: (first, second), predicates on nodes.
_SPLIT_KINDS = {
    "sliced": (_is_sliced_mm, _is_sliced_mm),
    "pairs": (_is_pair_mm, lambda node: _is_pair_mm(node, silu_mul=True)),
}


def _call_args(node: fx.Node) -> dict:
    bound = {arg.name: value for arg, value in zip(node.target._schema.arguments, node.args)}
    bound.update(node.kwargs)
    return bound


def _shape(node):
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _same_shape(a, b) -> bool:
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return a is not None and b is not None and len(a) == len(b) and all(
        statically_known_true(p == q) for p, q in zip(a, b))


def _through_views(node: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """The one user of ``node`` past views that keep its shape, with those views; None where a
    node on the way has another use."""
    shape, views = _shape(node), []
    while len(node.users) == 1:
        (user,) = node.users
        if user.target not in _VIEWS:
            return user, views
        if not _same_shape(_shape(user), shape):
            return None
        views.append(user)
        node = user
    return None


def _source_mm(node: fx.Node, is_mm) -> tuple[fx.Node, list[fx.Node]] | None:
    """The layer (a node that ``is_mm``) that ``node`` is (or is a shape-keeping view of), with
    those views, when each node from it to ``node`` has one use."""
    views = []
    while isinstance(node, fx.Node) and node.target in _VIEWS:
        if len(node.users) != 1 or not _same_shape(_shape(node), _shape(node.args[0])):
            return None
        views.append(node)
        node = node.args[0]
    if not isinstance(node, fx.Node) or not is_mm(node) or len(node.users) != 1:
        return None
    return node, views[::-1]


def _fake(value):
    return value.meta["val"] if isinstance(value, fx.Node) else value


def _call(graph: fx.Graph, op, args: tuple, outputs: int) -> list[fx.Node]:
    """``op(*args)`` inserted at the graph's insert point, with its getitems (outputs > 1) and the
    meta values the compiler needs."""
    fake_args = tuple(_fake(a) for a in args)
    mode = torch._guards.detect_fake_mode([v for v in fake_args if isinstance(v, torch.Tensor)])
    with mode or contextlib.nullcontext():
        val = op(*fake_args)
    node = graph.call_function(op, args)
    node.meta["val"] = val
    node.meta["eager_input_vals"] = (fake_args, {})  # the inputs' strides, kept for custom ops
    if outputs == 1:
        return [node]
    items = []
    for i in range(outputs):
        item = graph.call_function(operator.getitem, (node, i))
        item.meta["val"] = val[i]
        items.append(item)
    return items


def _split_one(graph: fx.Graph, norm: fx.Node, order: dict[fx.Node, int], kind: str) -> bool:
    is_first, is_second = _SPLIT_KINDS[kind]
    args = _call_args(norm)
    if args.get("variance_size") is not None:
        return False
    if not norm.users or any(u.target is not operator.getitem for u in norm.users):
        return False
    outs = {u.args[1]: u for u in norm.users}
    normed, residual_out = outs.get(0), outs.get(1)
    found = _source_mm(args["x"], is_first)
    if normed is None or found is None:
        return False
    mm1, views1 = found
    after = _through_views(normed)
    if after is None or not is_second(after[0]) or _call_args(after[0]).get("x") is not (
            after[1][-1] if after[1] else normed):
        return False
    mm2, views2 = after
    # The first op goes where the norm was, the second where mm2 was: what they read must come
    # before (the layers' tensors are graph inputs, so they do).
    first_args = _call_args(mm1)
    if any(isinstance(a, fx.Node) and order[a] > order[norm] for a in first_args.values()):
        return False
    schema1 = mm1.target._schema.arguments
    with graph.inserting_before(norm):
        new_residual, g, stats = _call(
            graph, torch.ops.vllm_gqsa.gqsa_mm_add_norm_stats.default,
            (first_args["x"], args["x_residual"], args["weight"],
             *(first_args.get(a.name, a.default_value) for a in schema1[1:])), 3)
    second_args = _call_args(mm2)
    silu_mul = mm2.target is torch.ops.vllm_gqsa.gqsa_mm_silu_mul.default  # the same arguments as gqsa_mm
    with graph.inserting_before(mm2):
        (y,) = _call(graph, torch.ops.vllm_gqsa.gqsa_stats_norm_mm.default,
                     (g, stats, args["epsilon"], new_residual, args["weight"],
                      *(second_args.get(a.name, a.default_value) for a in mm2.target._schema.arguments[1:]),
                      silu_mul), 1)
    mm2.replace_all_uses_with(y)
    if residual_out is not None:
        residual_out.replace_all_uses_with(new_residual)
    for dead in [mm2, *reversed(views2), normed, *([residual_out] if residual_out is not None else []), norm,
                 *reversed(views1), mm1]:
        graph.erase_node(dead)
    return True


def split_norms(graph: fx.Graph, kind: str = "sliced") -> int:
    """Rewrite ``gqsa_mm -> fused_add_rms_norm -> gqsa_mm`` into ``gqsa_mm_add_norm_stats ->
    gqsa_stats_norm_mm``, for sliced layers (kind "sliced") or pair layers ("pairs", whose second
    layer may be a ``gqsa_mm_silu_mul``); returns how many."""
    split = 0
    for node in [n for n in graph.nodes if _is_add_norm(n)]:
        # Numbered afresh for each norm: a split before it may have made the node a layer reads
        # (down reads the gate/up split's output).
        order = {n: i for i, n in enumerate(graph.nodes)}
        split += _split_one(graph, node, order, kind)
    global fused_total
    fused_total = _logged(split, fused_total, "RMSNorm(s) split between the GQSA layers around them")
    return split


def _logged(count: int, total: int, what: str) -> int:
    """total + count, saying once a process (then at debug level) how many of what a graph got."""
    if count:
        (logger.debug if total else logger.info)("GQSA: %d %s in a compiled graph", count, what)
    return total + count


_CONVERT = torch.ops.prims.convert_element_type.default


def _is(node, op) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is op


def _only_used_by(node: fx.Node, users: set[fx.Node]) -> bool:
    return len(node.users) > 0 and set(node.users) <= users


def _silu_input(node: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """(a, the nodes from a to node) where node computes silu(a) in a form that tracing SiluAndMul
    gives: ``silu(a)``, ``a / (1 + exp(-a))`` or ``a * sigmoid(a)``, in fp32 between conversions
    or not; None otherwise, or where a node on the way has a use outside."""
    inner = node.args[0] if _is(node, _CONVERT) else node
    if _is(inner, torch.ops.aten.silu.default):
        a, chain = inner.args[0], [inner]
    elif _is(inner, torch.ops.aten.div.Tensor):
        a, den = inner.args
        if not _is(den, torch.ops.aten.add.Tensor) or 1 not in den.args:
            return None
        exp = den.args[0] if den.args[1] == 1 else den.args[1]
        if not (_is(exp, torch.ops.aten.exp.default) and _is(exp.args[0], torch.ops.aten.neg.default)
                and exp.args[0].args[0] is a):
            return None
        chain = [exp.args[0], exp, den, inner]
    elif _is(inner, torch.ops.aten.mul.Tensor):
        sig = next((v for v in inner.args if _is(v, torch.ops.aten.sigmoid.default)), None)
        if sig is None or len(inner.args) != 2:
            return None
        a = inner.args[1] if inner.args[0] is sig else inner.args[0]
        if sig.args[0] is not a:
            return None
        chain = [sig, inner]
    else:
        return None
    if not isinstance(a, fx.Node):
        return None
    if inner is not node:
        chain.append(node)
    if _is(a, _CONVERT):  # computed in fp32
        chain.insert(0, a)
        a = a.args[0]
    # Every node but the last is used only inside the chain, the last only once (by the mul).
    inside = set(chain)
    if not all(_only_used_by(n, inside) for n in chain[:-1]) or len(node.users) != 1:
        return None
    return a, chain


def _slice_of(node: fx.Node, y: fx.Node) -> tuple[int, int] | None:
    """(start, end) where node is y[..., start:end] (one slice of y's last dimension)."""
    if not _is(node, torch.ops.aten.slice.Tensor) or node.args[0] is not y or node.kwargs:
        return None
    dim, start, end, step = (list(node.args[1:]) + [0, None, None, 1][len(node.args) - 1:])[:4]
    ndim = len(_shape(y) or ())
    if dim not in (-1, ndim - 1) or step != 1:
        return None
    return start if start is not None else 0, end


def _fuse_silu_mul_one(graph: fx.Graph, mm: fx.Node) -> bool:
    args = _call_args(mm)
    n_out = args.get("n_out")
    if not args.get("pairs") or args.get("sell_rows") is not None or args.get("xcols") is not None or n_out % 2:
        return False
    d = n_out // 2
    y, chain = mm, [mm]
    while len(y.users) == 1:  # views that keep the shape
        (user,) = y.users
        if user.target not in _VIEWS or not _same_shape(_shape(user), _shape(y)):
            break
        y = user
        chain.append(y)
    halves = {_slice_of(u, y): u for u in y.users}
    if len(y.users) != 2 or None in halves:
        return False
    gate = halves.get((0, d))
    up = next((u for (start, end), u in halves.items() if start == d and end is not None and end >= n_out), None)
    if gate is None or up is None or len(up.users) != 1:
        return False
    (mul,) = up.users
    if not _is(mul, torch.ops.aten.mul.Tensor) or len(mul.args) != 2 or up not in mul.args:
        return False
    act = mul.args[1] if mul.args[0] is up else mul.args[0]
    found = _silu_input(act) if isinstance(act, fx.Node) else None
    if found is None or found[0] is not gate or len(gate.users) != 1:
        return False
    val, out = mul.meta.get("val"), mm.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dtype != out.dtype or not _same_shape(_shape(mul), _shape(gate)):
        return False
    schema = torch.ops.vllm_gqsa.gqsa_mm_silu_mul.default._schema.arguments
    with graph.inserting_before(mul):
        (fused,) = _call(graph, torch.ops.vllm_gqsa.gqsa_mm_silu_mul.default,
                         tuple(args.get(a.name, a.default_value) for a in schema), 1)
    mul.replace_all_uses_with(fused)
    for dead in [mul, *reversed(found[1]), up, gate, *reversed(chain)]:
        graph.erase_node(dead)
    return True


def fuse_silu_mul(graph: fx.Graph) -> int:
    """Rewrite ``gqsa_mm`` of a gate/up layer in the pair pattern, followed by SiLU-and-mul, into
    ``gqsa_mm_silu_mul``; returns how many."""
    fused = sum(_fuse_silu_mul_one(graph, node) for node in list(graph.nodes)
                if node.target is torch.ops.vllm_gqsa.gqsa_mm.default)
    global silu_mul_total
    silu_mul_total = _logged(fused, silu_mul_total, "SiLU-and-mul(s) done by the gate/up layer before them")
    return fused


def _silu_mul_max_tokens() -> int:
    """The largest batch of gqsa_mm_silu_mul's compile range: the sparse-tensor-core kernel's, below
    the fused wgmma kernel's first batch."""
    from .kernels import cuda

    return min(cuda.dispatch(False, True)[1], cuda.PAIRS_WGMMA_MIN_TOKENS - 1)


def _pair_split_max_tokens() -> int:
    """The largest batch of the pair layers' norm split: the sparse-tensor-core kernel's, at most
    its split-norm instances' 32 tokens."""
    return min(_silu_mul_max_tokens(), ops.SP_NORM_MAX_TOKENS)


def _compile_range():
    """The range of batch sizes the graph being compiled serves (vLLM compiles a graph per range),
    or None outside vLLM's compiler."""
    try:
        from vllm.compilation.passes.inductor_pass import get_pass_context

        return get_pass_context().compile_range
    except (ImportError, AssertionError, AttributeError):
        return None


def _split_enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


def _silu_mul_enabled() -> bool:
    return os.environ.get(SILU_MUL_ENV, "1") != "0"


def _pairs_split_enabled() -> bool:
    return _split_enabled() and os.environ.get(PAIRS_ENV, "0") == "1"


_Base = _inductor_pass_base()

if _Base is not None:
    class GQSAFusionPass(_Base):
        """The pass as vLLM's pass manager takes it (its uuid, the source hash, keys the compile
        cache): the norm split in the graph for the batches the sliced GEMV serves, SiLU-and-mul
        fused in the one for 2 to 32 tokens; outside vLLM's compiler, both."""

        def __call__(self, graph: fx.Graph) -> None:
            compile_range = _compile_range()

            def serves(start: int, end: int) -> bool:
                return compile_range is None or (compile_range.start >= start and compile_range.end <= end)

            if _split_enabled() and serves(1, _split_max_tokens()):
                split_norms(graph, "sliced")
            if _silu_mul_enabled() and serves(2, _silu_mul_max_tokens()):
                fuse_silu_mul(graph)
            # After the SiLU-and-mul fusion: a gate/up layer it made is the second layer of a split.
            if _pairs_split_enabled() and serves(2, _pair_split_max_tokens()):
                split_norms(graph, "pairs")

        def uuid(self) -> str:
            # The key of vLLM's compile cache: this module's source (the rewrites live outside the
            # class, whose source alone is the default key) and the settings read while compiling.
            settings = (f"{_split_enabled()} {_silu_mul_enabled()} {_pairs_split_enabled()} "
                        f"{os.environ.get(TOKENS_ENV)}")
            return self.hash_source(inspect.getsource(sys.modules[__name__]), settings)

        def __deepcopy__(self, memo):  # vLLM deep-copies its inductor config; the pass is stateless
            return self
else:
    GQSAFusionPass = None


def install() -> bool:
    """Put the pass in the current vLLM config's compilation config, where vLLM's compiler will
    add it to its post-grad passes, and give the batches each rewrite serves a compile range of
    their own (vLLM reads the ranges when it compiles, after the model is built). Called while
    vLLM builds a GQSA model; True if installed."""
    if not (_split_enabled() or _silu_mul_enabled()) or GQSAFusionPass is None:
        return False
    try:
        from vllm.config import CompilationMode, get_current_vllm_config
    except ImportError:
        return False
    compilation = get_current_vllm_config().compilation_config
    if compilation.mode != CompilationMode.VLLM_COMPILE or not hasattr(compilation, "compile_ranges_endpoints"):
        return False
    current = compilation.inductor_compile_config.get(PASS_KEY)
    if isinstance(current, GQSAFusionPass):
        return True
    if current is not None:
        logger.warning("GQSA: a %s is already set, so each RMSNorm and SiLU-and-mul stays a kernel of its own",
                       PASS_KEY)
        return False
    compilation.inductor_compile_config[PASS_KEY] = GQSAFusionPass()
    endpoints = set(compilation.compile_ranges_endpoints or [])
    if _split_enabled():
        endpoints.add(_split_max_tokens())
    if _pairs_split_enabled():
        endpoints |= {1, _pair_split_max_tokens()}
    if _silu_mul_enabled():
        endpoints |= {1, _silu_mul_max_tokens()}
    compilation.compile_ranges_endpoints = sorted(endpoints)
    return True
