# SPDX-License-Identifier: Apache-2.0
"""The GQSA checkpoint format, version 1. This docstring is the specification.

GQSA (Group Quantization and Sparsity) stores a linear layer ``y = x @ W.T``,
``W`` of shape ``[N, K]`` (N output rows, K input channels), as the groups of
``G`` consecutive input channels that survived pruning, each quantized to
``bits`` bits with its own scale and zero point. Pruned groups are exactly zero.

Rows are taken ``R = block_rows`` at a time (R = 1 by default); the rows of one
row block share their pruning pattern, so a larger R amortizes the index over
more weights. Group ``(b, c)`` is row block ``b`` (rows ``b*R .. b*R+R-1``) and
group column ``c`` (input channels ``c*G .. c*G+G-1``). Kept groups are laid out
in block-sparse-row (BSR) order: row block by row block, and by increasing group
column inside a row block. With ``NB = N / R`` row blocks, ``KG = K / G`` group
columns and ``nnz`` kept groups, the tensors of a layer named ``PREFIX`` are:

===================  =========  ============================  =====================================
tensor               dtype      shape                         content
===================  =========  ============================  =====================================
``PREFIX.row_ptr``   int32      ``[NB + 1]``                  kept groups of row block b are
                                                              ``row_ptr[b] .. row_ptr[b+1]-1``;
                                                              ``row_ptr[0] = 0``, non-decreasing,
                                                              ``row_ptr[NB] = nnz``
``PREFIX.col_idx``   see below  ``[nnz]``                     group column of each kept group,
                                                              strictly increasing in a row block
``PREFIX.qweight``   uint8      ``[nnz, R, G * bits / 8]``    codes q in ``[0, 2**bits)``, packed
                                                              little-end first: weight j of a
                                                              group is bits ``(j*bits) % 8 ..``
                                                              of byte ``(j*bits) // 8``
``PREFIX.scales``    float16    ``[nnz, R]``                  scale s of each row of each group
``PREFIX.qzeros``    uint8      ``[ceil(nnz * R * bits / 8)]`` zero point z of each row of each
                                                              group, in ``scales`` order, packed
                                                              as the codes (``bits`` bits each)
===================  =========  ============================  =====================================

A kept weight is ``W[b*R + r, c*G + j] = s * (q - z)``; every other weight is 0.
A layer's bias, if it has one, stays dense as ``PREFIX.bias`` in the model dtype.

The index width follows K, so the index costs no more than it must:
``col_idx`` is uint8 when ``KG <= 256``, int16 when ``KG <= 32768``, else int32.

``config.json`` carries ``quantization_config`` (see :class:`GQSAQuantConfig`):
``quant_method = "gqsa"``, ``format_version``, ``bits``, ``group_size``,
``block_rows``, ``sparsity`` (the fraction of groups pruned, as converted),
``pattern`` (``"groups"``: any groups may be pruned; ``"pairs"``: every row block
keeps exactly one group of each aligned pair of group columns ``(2j, 2j + 1)``, so
its j-th kept group is in pair j and ``sparsity`` is 0.5; :func:`is_pair_pattern`
checks a layer; the plugin decides by that check, layer by layer),
``target_modules`` (the last name component of the linear layers that are
converted, e.g. ``q_proj``; ``lm_head`` when the output layer is converted, which
the checkpoint then stores untied from a dense embedding,
``tie_word_embeddings: false``) and ``modules_to_not_convert`` (full names of
target layers left dense, or of whole parts of the model whose layers all stay dense,
such as an image-text model's ``vision_tower``; ``null`` reads as none). A field that is
absent takes :class:`GQSAQuantConfig`'s default. Every other weight of the model is
stored as usual, under the names of the model's own checkpoints.

Everything here is pure torch and runs on the CPU: packing, unpacking,
validation and the row/column slicing used by tensor parallelism.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

FORMAT_VERSION = 1
QUANT_METHOD = "gqsa"
SUPPORTED_BITS = (2, 4, 8)
SUPPORTED_GROUP_SIZES = (16, 32, 64, 128)
PATTERNS = ("groups", "pairs")
DEFAULT_TARGET_MODULES = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
)
# The same layers in models whose checkpoints fuse q/k/v and gate/up (Phi-3).
FUSED_TARGET_MODULES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
TENSOR_NAMES = ("row_ptr", "col_idx", "qweight", "scales", "qzeros")
SCALE_DTYPE = torch.float16


class GQSAFormatError(ValueError):
    """A GQSA tensor or configuration breaks the format specification."""


def index_dtype(num_group_cols: int) -> torch.dtype:
    """The narrowest ``col_idx`` dtype that holds group columns ``0 .. num_group_cols-1``."""
    if num_group_cols <= 256:
        return torch.uint8
    if num_group_cols <= 32768:
        return torch.int16
    return torch.int32


@dataclass(frozen=True)
class GQSAQuantConfig:
    """The ``quantization_config`` of a GQSA checkpoint."""

    bits: int = 4
    group_size: int = 16
    block_rows: int = 1
    sparsity: float = 0.5
    # "groups": any groups of a row may be pruned; "pairs": each row (row block) keeps exactly one
    # group of each aligned pair of group columns (sparsity 0.5), which the sparse-tensor-core
    # kernel runs (is_pair_pattern).
    pattern: str = "groups"
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    modules_to_not_convert: tuple[str, ...] = field(default_factory=tuple)
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        if self.format_version != FORMAT_VERSION:
            raise GQSAFormatError(
                f"GQSA format_version {self.format_version} is not supported; this "
                f"version of vllm-gqsa reads format_version {FORMAT_VERSION}")
        if self.bits not in SUPPORTED_BITS:
            raise GQSAFormatError(f"bits={self.bits} is not supported; choose one of {SUPPORTED_BITS}")
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise GQSAFormatError(
                f"group_size={self.group_size} is not supported; choose one of {SUPPORTED_GROUP_SIZES}")
        if not (isinstance(self.block_rows, int) and 1 <= self.block_rows <= 64):
            raise GQSAFormatError(f"block_rows={self.block_rows} must be an integer in 1..64")
        if not (0.0 <= self.sparsity < 1.0):
            raise GQSAFormatError(f"sparsity={self.sparsity} must be in [0, 1)")
        if self.pattern not in PATTERNS:
            raise GQSAFormatError(f"pattern={self.pattern!r} is not supported; choose one of {PATTERNS}")
        if self.pattern == "pairs" and self.sparsity != 0.5:
            raise GQSAFormatError(f"pattern 'pairs' keeps one group of every two: sparsity must be 0.5, "
                                  f"got {self.sparsity}")
        if not self.target_modules:
            raise GQSAFormatError("target_modules is empty: no layer would be quantized")

    def to_dict(self) -> dict:
        return {
            "quant_method": QUANT_METHOD,
            "format_version": self.format_version,
            "bits": self.bits,
            "group_size": self.group_size,
            "block_rows": self.block_rows,
            "sparsity": self.sparsity,
            "pattern": self.pattern,
            "target_modules": list(self.target_modules),
            "modules_to_not_convert": list(self.modules_to_not_convert),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "GQSAQuantConfig":
        if not isinstance(d, dict):
            raise GQSAFormatError(f"quantization_config must be a JSON object, got {type(d).__name__}")
        method = str(d.get("quant_method", QUANT_METHOD)).lower()
        if method != QUANT_METHOD:
            raise GQSAFormatError(f"quant_method is {method!r}, not {QUANT_METHOD!r}")
        kwargs = {}
        for key, kind in (("format_version", int), ("bits", int), ("group_size", int),
                          ("block_rows", int), ("sparsity", float)):
            if key in d:
                value = d[key]
                # json reads NaN and Infinity too, which int() cannot take.
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
                        kind is int and value != int(value)):
                    raise GQSAFormatError(f"quantization_config.{key} must be a number, got {value!r}")
                kwargs[key] = kind(value)
        if "pattern" in d:  # checkpoints written before patterns existed have none: "groups"
            if not isinstance(d["pattern"], str):
                raise GQSAFormatError(f"quantization_config.pattern must be a string, got {d['pattern']!r}")
            kwargs["pattern"] = d["pattern"]
        for key in ("target_modules", "modules_to_not_convert"):
            if key in d:
                value = d[key]
                if value is None and key == "modules_to_not_convert":
                    value = []  # what other quantization configs write for "none"
                if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                    raise GQSAFormatError(f"quantization_config.{key} must be a list of strings")
                kwargs[key] = tuple(value)
        return cls(**kwargs)

    def is_quantized(self, module_name: str) -> bool:
        """Whether the linear layer with this Hugging Face module name is stored as GQSA. An entry
        of ``modules_to_not_convert`` names one layer or a whole part of the model (such as an
        image-text model's ``vision_tower``): every module under it stays dense."""
        return (module_name.rsplit(".", 1)[-1] in self.target_modules
                and not any(module_name == m or module_name.startswith(m + ".")
                            for m in self.modules_to_not_convert))

    def layer_format(self) -> "LayerFormat":
        return LayerFormat(self.bits, self.group_size, self.block_rows)


@dataclass(frozen=True)
class LayerFormat:
    """The format parameters every tensor of a layer depends on."""

    bits: int = 4
    group_size: int = 16
    block_rows: int = 1

    @property
    def code_bytes(self) -> int:
        """Bytes of packed codes per row of a group."""
        return self.group_size * self.bits // 8

    def check_shape(self, out_features: int, in_features: int, name: str = "layer") -> None:
        if in_features % self.group_size:
            raise GQSAFormatError(
                f"{name}: input size {in_features} is not a multiple of group_size {self.group_size}")
        if out_features % self.block_rows:
            raise GQSAFormatError(
                f"{name}: output size {out_features} is not a multiple of block_rows {self.block_rows}")


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-bit integers along the last dim, lowest bits first."""
    per_byte = 8 // bits
    if codes.shape[-1] % per_byte:
        raise GQSAFormatError(f"last dim {codes.shape[-1]} is not a multiple of {per_byte}")
    c = codes.to(torch.int32).reshape(*codes.shape[:-1], codes.shape[-1] // per_byte, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.int32, device=codes.device) * bits
    return (c << shifts).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 ``[..., L]`` to uint8 ``[..., L * 8 / bits]``."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.int32, device=packed.device) * bits
    c = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return c.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte).to(torch.uint8)


def pack_flat(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a flat list of ``bits``-bit integers, zero-padded to whole bytes (``qzeros``)."""
    values = values.reshape(-1)
    pad = (-values.numel()) % (8 // bits)
    if pad:
        values = torch.cat([values, values.new_zeros(pad)])
    return pack_bits(values, bits)


def unpack_flat(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    return unpack_bits(packed, bits)[:count]


@dataclass
class GQSALayer:
    """The packed tensors of one GQSA linear layer (see the module docstring)."""

    row_ptr: torch.Tensor
    col_idx: torch.Tensor
    qweight: torch.Tensor
    scales: torch.Tensor
    qzeros: torch.Tensor
    out_features: int
    in_features: int
    fmt: LayerFormat

    @property
    def nnz(self) -> int:
        return self.col_idx.numel()

    @property
    def num_group_cols(self) -> int:
        return self.in_features // self.fmt.group_size

    def tensors(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in TENSOR_NAMES}

    def zeros(self) -> torch.Tensor:
        """Zero points as uint8 ``[nnz, R]``."""
        R = self.fmt.block_rows
        return unpack_flat(self.qzeros, self.fmt.bits, self.nnz * R).reshape(self.nnz, R)

    def codes(self) -> torch.Tensor:
        """Codes as uint8 ``[nnz, R, G]``."""
        return unpack_bits(self.qweight, self.fmt.bits)

    def block_ids(self) -> torch.Tensor:
        """Row block of every kept group, int64 ``[nnz]``. Sync-free (the output size is known),
        so the reference math can run inside a CUDA graph."""
        counts = (self.row_ptr[1:] - self.row_ptr[:-1]).long()
        return torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts,
                                       output_size=self.nnz)

    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def bits_per_weight(self) -> float:
        """Bits stored per weight of the dense ``[N, K]`` matrix, all metadata included."""
        return 8 * self.storage_bytes() / (self.out_features * self.in_features)

    def to(self, device) -> "GQSALayer":
        return GQSALayer(**{n: t.to(device) for n, t in self.tensors().items()},
                         out_features=self.out_features, in_features=self.in_features, fmt=self.fmt)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], out_features: int, in_features: int,
                     fmt: LayerFormat, name: str = "layer") -> "GQSALayer":
        """Build a layer from checkpoint tensors, validating every one of them."""
        missing = [n for n in TENSOR_NAMES if n not in tensors]
        if missing:
            raise GQSAFormatError(f"{name}: missing tensor(s) {', '.join(name + '.' + m for m in missing)}")
        layer = cls(**{n: tensors[n] for n in TENSOR_NAMES},
                    out_features=out_features, in_features=in_features, fmt=fmt)
        layer.validate(name)
        return layer

    def validate(self, name: str = "layer") -> None:
        """Raise :class:`GQSAFormatError` naming the layer and the fault if anything is inconsistent.

        After this passes, every index a kernel reads is in range: ``row_ptr`` is a valid
        partition of ``[0, nnz)`` and every ``col_idx`` is in ``[0, K/G)``.
        """
        fmt = self.fmt
        fmt.check_shape(self.out_features, self.in_features, name)
        NB = self.out_features // fmt.block_rows
        KG = self.in_features // fmt.group_size
        R = fmt.block_rows

        def fail(msg):
            raise GQSAFormatError(f"{name}: {msg}")

        def check(t_name, dtype, shape):
            t = getattr(self, t_name)
            if not isinstance(t, torch.Tensor):
                fail(f"{t_name} is not a tensor")
            if t.dtype != dtype:
                fail(f"{t_name} has dtype {t.dtype}, expected {dtype}")
            if tuple(t.shape) != tuple(shape):
                fail(f"{t_name} has shape {list(t.shape)}, expected {list(shape)}")

        if not isinstance(self.col_idx, torch.Tensor) or self.col_idx.dim() != 1:
            fail("col_idx must be a 1-D tensor")
        nnz = self.col_idx.numel()
        check("row_ptr", torch.int32, [NB + 1])
        check("col_idx", index_dtype(KG), [nnz])
        check("qweight", torch.uint8, [nnz, R, fmt.code_bytes])
        check("scales", SCALE_DTYPE, [nnz, R])
        check("qzeros", torch.uint8, [math.ceil(nnz * R * fmt.bits / 8)])

        rp = self.row_ptr.long()
        if rp[0].item() != 0:
            fail(f"row_ptr[0] is {rp[0].item()}, expected 0")
        counts = rp[1:] - rp[:-1]
        if (counts < 0).any():
            b = int(torch.nonzero(counts < 0)[0])
            fail(f"row_ptr decreases at row block {b} ({rp[b].item()} -> {rp[b + 1].item()})")
        if rp[-1].item() != nnz:
            fail(f"row_ptr[-1] is {rp[-1].item()} but there are {nnz} kept groups (col_idx length)")
        if (counts > KG).any():
            b = int(torch.nonzero(counts > KG)[0])
            fail(f"row block {b} has {counts[b].item()} groups, more than the {KG} group columns")
        ci = self.col_idx.long()
        if nnz:
            bad = (ci < 0) | (ci >= KG)
            if bad.any():
                i = int(torch.nonzero(bad)[0])
                fail(f"col_idx[{i}] = {ci[i].item()} is out of range [0, {KG})")
            starts = torch.zeros(nnz, dtype=torch.bool, device=ci.device)
            starts[rp[:-1][counts > 0]] = True
            not_increasing = (ci[1:] <= ci[:-1]) & ~starts[1:]
            if not_increasing.any():
                i = int(torch.nonzero(not_increasing)[0]) + 1
                fail(f"col_idx is not strictly increasing inside a row block at position {i} "
                     f"({ci[i - 1].item()} then {ci[i].item()})")
            if not torch.isfinite(self.scales).all():
                i = int(torch.nonzero(~torch.isfinite(self.scales.float()).all(-1))[0])
                fail(f"scales of kept group {i} are not finite ({self.scales[i].tolist()})")

    # --- slicing, used to shard a layer for tensor parallelism --------------------------

    def select_rows(self, start: int, end: int) -> "GQSALayer":
        """Rows ``start .. end-1`` (output channels) as a layer of their own."""
        R = self.fmt.block_rows
        if start % R or end % R or not 0 <= start <= end <= self.out_features:
            raise GQSAFormatError(
                f"cannot take rows [{start}, {end}) of a layer with {self.out_features} rows "
                f"in blocks of {R}")
        b0, b1 = start // R, end // R
        g0, g1 = int(self.row_ptr[b0]), int(self.row_ptr[b1])
        return self._subset(torch.arange(g0, g1, device=self.col_idx.device),
                            self.row_ptr[b0:b1 + 1] - g0, end - start, self.in_features, 0)

    def select_input(self, start: int, end: int) -> "GQSALayer":
        """Input channels ``start .. end-1`` as a layer of their own (row-parallel sharding)."""
        G = self.fmt.group_size
        if start % G or end % G or not 0 <= start <= end <= self.in_features:
            raise GQSAFormatError(
                f"cannot split input channels at [{start}, {end}): the boundaries must be multiples "
                f"of group_size {G} (input size {self.in_features})")
        c0, c1 = start // G, end // G
        ci = self.col_idx.long()
        keep = (ci >= c0) & (ci < c1)
        blocks = self.block_ids()[keep]
        counts = torch.bincount(blocks, minlength=self.row_ptr.numel() - 1)
        row_ptr = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=counts.device)
        row_ptr[1:] = torch.cumsum(counts, 0)
        return self._subset(torch.nonzero(keep).flatten(), row_ptr, self.out_features, end - start, c0)

    def _subset(self, idx, row_ptr, out_features, in_features, col_offset) -> "GQSALayer":
        KG = in_features // self.fmt.group_size
        zeros = self.zeros()[idx]
        return GQSALayer(
            row_ptr=row_ptr.to(torch.int32),
            col_idx=(self.col_idx.long()[idx] - col_offset).to(index_dtype(KG)),
            qweight=self.qweight[idx], scales=self.scales[idx],
            qzeros=pack_flat(zeros, self.fmt.bits),
            out_features=out_features, in_features=in_features, fmt=self.fmt)

    def single_rows(self) -> "GQSALayer":
        """The same weights with ``block_rows = 1``: each row of a row block keeps the block's
        group columns, with its own codes, scale and zero point. (Rows then carry their own index,
        so this costs index bytes; the kernel format carries a column with every group anyway.)"""
        R = self.fmt.block_rows
        if R == 1:
            return self
        start = self.row_ptr[:-1].long()
        count = self.row_ptr[1:].long() - start
        blocks = self.block_ids()
        # Group g, j-th of block b, row i of the block goes to R * start[b] + i * count[b] + j.
        first = R * start[blocks] + (torch.arange(self.nnz, device=blocks.device) - start[blocks])
        rows = torch.arange(R, device=blocks.device)
        pos = (first.unsqueeze(1) + rows * count[blocks].unsqueeze(1)).reshape(-1)  # [nnz * R]
        n = self.nnz * R

        def scatter(t: torch.Tensor) -> torch.Tensor:  # t: [nnz, R, ...] in (group, row) order
            out = t.new_empty((n, *t.shape[2:]))
            out[pos] = t.reshape(n, *t.shape[2:])
            return out

        row_ptr = torch.empty(self.out_features + 1, dtype=torch.int32, device=self.row_ptr.device)
        row_ptr[:-1] = (R * start.unsqueeze(1) + rows * count.unsqueeze(1)).reshape(-1).to(torch.int32)
        row_ptr[-1] = n
        fmt = LayerFormat(self.fmt.bits, self.fmt.group_size, 1)
        return GQSALayer(
            row_ptr=row_ptr, col_idx=scatter(self.col_idx.unsqueeze(1).expand(-1, R)),
            qweight=scatter(self.qweight).unsqueeze(1), scales=scatter(self.scales).unsqueeze(1),
            qzeros=pack_flat(scatter(self.zeros()), fmt.bits),
            out_features=self.out_features, in_features=self.in_features, fmt=fmt)

    @classmethod
    def empty(cls, out_features: int, in_features: int, fmt: LayerFormat) -> "GQSALayer":
        """A layer with no kept groups: all weights zero (padding rows)."""
        fmt.check_shape(out_features, in_features, "empty layer")
        R, KG = fmt.block_rows, in_features // fmt.group_size
        return cls(row_ptr=torch.zeros(out_features // R + 1, dtype=torch.int32),
                   col_idx=torch.zeros(0, dtype=index_dtype(KG)),
                   qweight=torch.zeros(0, R, fmt.code_bytes, dtype=torch.uint8),
                   scales=torch.zeros(0, R, dtype=SCALE_DTYPE), qzeros=torch.zeros(0, dtype=torch.uint8),
                   out_features=out_features, in_features=in_features, fmt=fmt)

    @staticmethod
    def concat_rows(layers: list["GQSALayer"]) -> "GQSALayer":
        """Stack layers with equal input size along the output dimension (fused QKV, gate/up).
        Layers whose row blocks differ (some cut into single rows by tensor parallelism or vLLM's
        vocabulary padding) are stacked as single rows."""
        if len({l.fmt.block_rows for l in layers}) > 1:
            layers = [l.single_rows() for l in layers]
        first = layers[0]
        if any(l.in_features != first.in_features or l.fmt != first.fmt for l in layers):
            raise GQSAFormatError("cannot fuse GQSA layers with different input sizes or formats")
        ptrs, total = [], 0
        for i, l in enumerate(layers):
            ptrs.append(l.row_ptr[(0 if i == 0 else 1):].long() + total)
            total += l.nnz
        KG = first.num_group_cols
        return GQSALayer(
            row_ptr=torch.cat(ptrs).to(torch.int32),
            col_idx=torch.cat([l.col_idx.long() for l in layers]).to(index_dtype(KG)),
            qweight=torch.cat([l.qweight for l in layers]),
            scales=torch.cat([l.scales for l in layers]),
            qzeros=pack_flat(torch.cat([l.zeros().reshape(-1) for l in layers]), first.fmt.bits),
            out_features=sum(l.out_features for l in layers), in_features=first.in_features,
            fmt=first.fmt)


def is_pair_pattern(row_ptr: torch.Tensor, cols: torch.Tensor, num_group_cols: int) -> bool:
    """Whether every row (row block) keeps exactly one group of each aligned pair of group columns
    (2j, 2j + 1): with ``cols`` in each row's column order, row r has ``num_group_cols / 2`` groups
    and its j-th is in pair j. This is what ``gqsa-convert --pattern pairs`` writes, and what the
    sparse-tensor-core kernel needs. Any device; never raises for a well-formed layer."""
    if num_group_cols <= 0 or num_group_cols % 2:
        return False
    pairs = num_group_cols // 2
    rows = row_ptr.numel() - 1
    if rows < 0 or cols.numel() != rows * pairs:
        return False
    if not torch.equal(row_ptr.long(), torch.arange(rows + 1, device=row_ptr.device) * pairs):
        return False
    j = torch.arange(pairs, device=cols.device).repeat(rows)
    return bool(torch.equal(cols.long() // 2, j))


def pack_layer(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               keep: torch.Tensor, fmt: LayerFormat) -> GQSALayer:
    """Pack dense quantization results into a :class:`GQSALayer`.

    ``codes``: integers in ``[0, 2**bits)`` of shape ``[N, K]``; ``scales``, ``zeros``:
    ``[N, K/G]``; ``keep``: bool ``[N/R, K/G]``, the groups that survive pruning.
    Values at pruned positions are ignored.
    """
    N, K = codes.shape
    fmt.check_shape(N, K)
    G, R = fmt.group_size, fmt.block_rows
    NB, KG = N // R, K // G
    if tuple(scales.shape) != (N, KG) or tuple(zeros.shape) != (N, KG) or tuple(keep.shape) != (NB, KG):
        raise GQSAFormatError(
            f"pack_layer: expected scales/zeros [{N}, {KG}] and keep [{NB}, {KG}], got "
            f"{list(scales.shape)}, {list(zeros.shape)}, {list(keep.shape)}")
    top = (1 << fmt.bits) - 1
    if codes.numel() and (codes.min() < 0 or codes.max() > top):
        raise GQSAFormatError(f"pack_layer: codes must be in [0, {top}]")
    if zeros.numel() and (zeros.min() < 0 or zeros.max() > top):
        raise GQSAFormatError(f"pack_layer: zero points must be in [0, {top}]")
    blocks, cols = torch.nonzero(keep, as_tuple=True)  # row-major: BSR order
    row_ptr = torch.zeros(NB + 1, dtype=torch.int32, device=keep.device)
    row_ptr[1:] = torch.cumsum(keep.sum(1), 0)
    c = codes.reshape(NB, R, KG, G)[blocks, :, cols]  # [nnz, R, G]
    s = scales.reshape(NB, R, KG)[blocks, :, cols]  # [nnz, R]
    z = zeros.reshape(NB, R, KG)[blocks, :, cols]
    layer = GQSALayer(
        row_ptr=row_ptr, col_idx=cols.to(index_dtype(KG)),
        qweight=pack_bits(c.to(torch.uint8), fmt.bits), scales=s.to(SCALE_DTYPE),
        qzeros=pack_flat(z.to(torch.uint8), fmt.bits), out_features=N, in_features=K, fmt=fmt)
    return layer


def expected_bits_per_weight(fmt: LayerFormat, out_features: int, in_features: int,
                             density: float) -> float:
    """Bits per weight of a layer in which a fraction ``density`` of the groups is kept."""
    G, R, bits = fmt.group_size, fmt.block_rows, fmt.bits
    NB, KG = out_features // R, in_features // G
    nnz = round(NB * KG * density)
    idx_bits = index_dtype(KG).itemsize * 8
    total = 32 * (NB + 1) + nnz * idx_bits + nnz * R * (G * bits + 16) + 8 * math.ceil(nnz * R * bits / 8)
    return total / (out_features * in_features)
