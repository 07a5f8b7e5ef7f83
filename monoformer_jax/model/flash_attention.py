"""Flash attention for the MonoFormer mask, as Pallas TPU kernels (forward, dq, dk/dv).

The mask is never materialised. Every query carries its segment id and its *reach*, the last
position it may see: its own position for text (causal), the last position of its image block for
the tokens of a bidirectional image; every key carries its segment id, and its position is its
index. Then, exactly as model/mask.py,

    allowed(q, k) = segment(q) == segment(k) > 0  and  k <= reach(q)

because an image's tokens are contiguous: seeing up to the block's end is seeing everything before
it (causal) plus the whole block. Splash attention cannot say this (its masks are static, data
enters only as segment-id equality), which is why these kernels exist. A key block past every
reach of a query block is skipped (roughly half the square for causal text).

A query with no allowed key (padding) gets a zero output and no gradient; the dense path averages
every value there instead. Nothing reads such a query's output, and the tests compare the rest.
On CPU the kernels run in Pallas' interpreter (exact, slow: tests use tiny blocks).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax._src import mesh as jax_mesh  # pylint: disable=protected-access  # see _context_mesh
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

Array = jax.Array

LANES, SUBLANES = 128, 8  # per-token arrays are broadcast to the TPU's (8, 128) tiles
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: no inf - inf on a masked row


def _tile_mask(mask_refs, k_block: int, block_k: int):
  """The (block_q, block_k) allowed mask of a tile, and whether any of it can be allowed;
  `mask_refs`: (qseg, qreach, kseg)."""
  qseg_ref, qreach_ref, kseg_ref = mask_refs
  qseg = jnp.max(qseg_ref[0], axis=1, keepdims=True)  # (bq, 1): every lane holds the value
  reach = jnp.max(qreach_ref[0], axis=1, keepdims=True)
  kseg = jnp.max(kseg_ref[0], axis=0, keepdims=True)  # (1, bk): every sublane holds it
  kpos = k_block * block_k + jax.lax.broadcasted_iota(jnp.int32, kseg.shape, 1)
  allowed = (qseg == kseg) & (kseg > 0) & (kpos <= reach)
  return allowed, k_block * block_k <= jnp.max(reach)


def _scores(q, k, scale):
  s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  return s * scale


def _forward_kernel(*refs, scale, block_k):
  """refs as pallas_call passes them: the inputs (qseg, qreach, kseg, q, k, v), the outputs (o,
  lse) and the scratch (running max m, running sum l, accumulator)."""
  mask_refs, (q_ref, k_ref, v_ref), (o_ref, lse_ref), (m_sc, l_sc, acc_sc) = refs[:3], refs[3:6], refs[6:8], refs[8:]
  j = pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, _MASKED, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  allowed, visible = _tile_mask(mask_refs, j, block_k)

  @pl.when(visible)
  def _step():
    v = v_ref[0, 0]
    s = jnp.where(allowed, _scores(q_ref[0, 0], k_ref[0, 0], scale), _MASKED)
    m_prev = jnp.max(m_sc[...], axis=1, keepdims=True)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    p = jnp.where(allowed, jnp.exp(s - m_new), 0.0)
    alpha = jnp.exp(m_prev - m_new)
    l_new = alpha * jnp.max(l_sc[...], axis=1, keepdims=True) + jnp.sum(p, axis=1, keepdims=True)
    pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    acc_sc[...] = alpha * acc_sc[...] + pv
    m_sc[...] = jnp.broadcast_to(m_new, m_sc.shape)
    l_sc[...] = jnp.broadcast_to(l_new, l_sc.shape)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    l = jnp.max(l_sc[...], axis=1, keepdims=True)
    m = jnp.max(m_sc[...], axis=1, keepdims=True)
    seen = l > 0
    o_ref[0, 0] = jnp.where(seen, acc_sc[...] / jnp.where(seen, l, 1.0), 0.0).astype(o_ref.dtype)
    lse_ref[0, 0] = jnp.broadcast_to(jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), _MASKED), lse_ref.shape[2:])


def _recompute(in_refs, k_block, scale, block_k):
  """p, ds of a tile from the saved log-sum-exp (the standard flash backward); `in_refs`: the
  backward kernels' inputs (qseg, qreach, kseg, q, k, v, do, lse, di)."""
  mask_refs, (q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref) = in_refs[:3], in_refs[3:]
  allowed, _ = _tile_mask(mask_refs, k_block, block_k)
  lse = jnp.max(lse_ref[0, 0], axis=1, keepdims=True)
  di = jnp.max(di_ref[0, 0], axis=1, keepdims=True)
  p = jnp.where(allowed, jnp.exp(_scores(q_ref[0, 0], k_ref[0, 0], scale) - lse), 0.0)
  dp = _scores(do_ref[0, 0], v_ref[0, 0], 1.0)
  return p, p * (dp - di)


def _dq_kernel(*refs, scale, block_k):
  """refs: the inputs (as `_recompute`), the output dq and its scratch accumulator."""
  in_refs, (dq_ref, dq_sc) = refs[:9], refs[9:]
  j = pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  _, visible = _tile_mask(in_refs[:3], j, block_k)

  @pl.when(visible)
  def _step():
    _, ds = _recompute(in_refs, j, scale, block_k)
    k = in_refs[4][0, 0]
    dq_sc[...] += jax.lax.dot_general(
        ds.astype(k.dtype), k, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[0, 0] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, scale, block_k):
  """refs: the inputs (as `_recompute`), the outputs dk, dv and their scratch accumulators."""
  in_refs, (dk_ref, dv_ref, dk_sc, dv_sc) = refs[:9], refs[9:]
  j, i = pl.program_id(2), pl.program_id(3)

  @pl.when(i == 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  _, visible = _tile_mask(in_refs[:3], j, block_k)

  @pl.when(visible)
  def _step():
    p, ds = _recompute(in_refs, j, scale, block_k)
    q, do = in_refs[3][0, 0], in_refs[6][0, 0]
    dv_sc[...] += jax.lax.dot_general(
        p.astype(do.dtype), do, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )
    dk_sc[...] += jax.lax.dot_general(
        ds.astype(q.dtype), q, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )

  @pl.when(i == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[0, 0] = (dk_sc[...] * scale).astype(dk_ref.dtype)
    dv_ref[0, 0] = dv_sc[...].astype(dv_ref.dtype)


def _specs(groups: int, block_q: int, block_k: int, d: int, q_first: bool):
  """BlockSpecs of (qseg, qreach, kseg, q, k, v, do, lse, di) for a grid (b, h, i, j) over query
  blocks i and key blocks j (`q_first`) or (b, h, j, i) (the dk/dv kernel)."""

  def qk(fn):  # index maps written as (b, h, query block, key block), whatever the grid order
    return fn if q_first else (lambda b, h, j, i: fn(b, h, i, j))

  per_q = pl.BlockSpec((1, block_q, LANES), qk(lambda b, h, i, j: (b, i, 0)))
  per_k = pl.BlockSpec((1, SUBLANES, block_k), qk(lambda b, h, i, j: (b, 0, j)))
  q_rows = pl.BlockSpec((1, 1, block_q, d), qk(lambda b, h, i, j: (b, h, i, 0)))
  kv_rows = pl.BlockSpec((1, 1, block_k, d), qk(lambda b, h, i, j: (b, h // groups, j, 0)))
  q_lanes = pl.BlockSpec((1, 1, block_q, LANES), qk(lambda b, h, i, j: (b, h, i, 0)))
  return per_q, per_k, q_rows, kv_rows, q_lanes


def _params(interpret: bool, args, outs, matmuls: int, reread: dict):
  """pallas_call options, with the cost XLA's analysis should count for the kernel (it cannot see
  inside): `matmuls` (Lq x Lk x D) products per head over the whole square (no block skipped:
  an upper bound), one exp per score, operand n read `reread.get(n, 1)` times (once per block of
  the other side for those the grid's inner axis walks)."""
  q, k = args[3], args[4]
  b, h, lq, d = q.shape
  lk = k.shape[2]
  size = lambda x: int(x.size) * x.dtype.itemsize  # noqa: E731
  read = sum(size(x) * reread.get(n, 1) for n, x in enumerate(args)) + sum(size(x) for x in outs)
  cost = pl.CostEstimate(flops=2 * matmuls * b * h * lq * lk * d, transcendentals=b * h * lq * lk, bytes_accessed=read)
  return dict(
      interpret=interpret,
      cost_estimate=cost,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
  )


class _Blocks(NamedTuple):
  """The kernels' static tiling: query and key block sizes, and whether to run interpreted."""

  block_q: int
  block_k: int
  interpret: bool


def _forward(q, k, v, qseg, qreach, kseg, blocks: _Blocks):
  block_q, block_k = blocks.block_q, blocks.block_k
  b, h, lq, d = q.shape
  kvh, lk = k.shape[1], k.shape[2]
  per_q, per_k, q_rows, kv_rows, q_lanes = _specs(h // kvh, block_q, block_k, d, True)
  kernel = functools.partial(_forward_kernel, scale=float(d) ** -0.5, block_k=block_k)
  args = (qseg, qreach, kseg, q, k, v)
  outs = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, lq, LANES), jnp.float32)]
  return pl.pallas_call(
      kernel,
      grid=(b, h, lq // block_q, lk // block_k),
      in_specs=[per_q, per_q, per_k, q_rows, kv_rows, kv_rows],
      out_specs=[q_rows, q_lanes],
      out_shape=outs,
      scratch_shapes=[pltpu.VMEM((block_q, LANES), jnp.float32)] * 2 + [pltpu.VMEM((block_q, d), jnp.float32)],
      **_params(blocks.interpret, args, outs, 2, {2: lq // block_q, 4: lq // block_q, 5: lq // block_q}),
  )(*args)


def _backward_dq(args, blocks: _Blocks, groups: int):
  """dq (B, H, Lq, D) of the backward kernels' inputs `args` (as `_recompute`)."""
  block_q, block_k = blocks.block_q, blocks.block_k
  q, k = args[3], args[4]
  b, h, lq, d = q.shape
  per_q, per_k, q_rows, kv_rows, q_lanes = _specs(groups, block_q, block_k, d, True)
  dq_out = jax.ShapeDtypeStruct(q.shape, q.dtype)
  return pl.pallas_call(
      functools.partial(_dq_kernel, scale=float(d) ** -0.5, block_k=block_k),
      grid=(b, h, lq // block_q, k.shape[2] // block_k),
      in_specs=[per_q, per_q, per_k, q_rows, kv_rows, kv_rows, q_rows, q_lanes, q_lanes],
      out_specs=q_rows,
      out_shape=dq_out,
      scratch_shapes=[pltpu.VMEM((block_q, d), jnp.float32)],
      **_params(blocks.interpret, args, [dq_out], 3, {2: lq // block_q, 4: lq // block_q, 5: lq // block_q}),
  )(*args)


def _backward_dkv(args, blocks: _Blocks, groups: int):
  """dk, dv (B, H, Lk, D) float32, one per query head, of the backward kernels' inputs `args`."""
  block_q, block_k = blocks.block_q, blocks.block_k
  q, k = args[3], args[4]
  b, h, lq, d = q.shape
  lk = k.shape[2]
  per_q, per_k, q_rows, kv_rows, q_lanes = _specs(groups, block_q, block_k, d, False)
  # One dk / dv per query head (each kernel instance owns its output block), summed per group.
  k_rows = pl.BlockSpec((1, 1, block_k, d), lambda b_, h_, j, i: (b_, h_, j, 0))
  dkv_out = [jax.ShapeDtypeStruct((b, h, lk, d), jnp.float32)] * 2
  return pl.pallas_call(
      functools.partial(_dkv_kernel, scale=float(d) ** -0.5, block_k=block_k),
      grid=(b, h, lk // block_k, lq // block_q),
      in_specs=[per_q, per_q, per_k, q_rows, kv_rows, kv_rows, q_rows, q_lanes, q_lanes],
      out_specs=[k_rows, k_rows],
      out_shape=dkv_out,
      scratch_shapes=[pltpu.VMEM((block_k, d), jnp.float32)] * 2,
      **_params(blocks.interpret, args, dkv_out, 4, {n: lk // block_k for n in (0, 1, 3, 6, 7, 8)}),
  )(*args)


def _backward(residuals, do, blocks: _Blocks):
  q, k, v, qseg, qreach, kseg, o, lse = residuals
  b, h, lq, _ = q.shape
  kvh = k.shape[1]
  di = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True)
  di = jnp.broadcast_to(di, (b, h, lq, LANES))
  args = (qseg, qreach, kseg, q, k, v, do, lse, di)
  dq = _backward_dq(args, blocks, h // kvh)
  dk, dv = _backward_dkv(args, blocks, h // kvh)

  def per_kv_head(x, like):
    return x.reshape(b, kvh, h // kvh, *x.shape[2:]).sum(axis=2).astype(like.dtype)

  return dq, per_kv_head(dk, k), per_kv_head(dv, v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash(q, k, v, qseg, qreach, kseg, blocks: _Blocks):
  return _forward(q, k, v, qseg, qreach, kseg, blocks)[0]


def _flash_fwd(q, k, v, qseg, qreach, kseg, blocks: _Blocks):
  o, lse = _forward(q, k, v, qseg, qreach, kseg, blocks)
  return o, (q, k, v, qseg, qreach, kseg, o, lse)


def _flash_bwd(blocks: _Blocks, residuals, do):
  dq, dk, dv = _backward(residuals, do, blocks)
  return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _pad_to(x: Array, axis: int, multiple: int) -> Array:
  pad = -x.shape[axis] % multiple
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)


def flash_attention(
    q: Array,
    k: Array,
    v: Array,
    spans: dict,
    *,
    block_q: int = 128,
    block_k: int = 128,
    interpret: bool | None = None,
) -> Array:
  """q (B, Lq, H, D); k, v (B, KVH, Lk, D); `spans` (mask.kernel_spans): q_segment, q_reach
  (B, Lq), k_segment (B, Lk). Returns (B, Lq, H, D). Lengths are padded to the blocks (padding is
  segment 0: masked); `interpret` defaults to True off TPU (Pallas' interpreter)."""
  if interpret is None:
    interpret = jax.default_backend() != "tpu"
  lq = q.shape[1]
  # One block over a short axis (a block may equal the whole axis), else the given sizes.
  bq, bk = min(block_q, _round_up(lq, SUBLANES)), min(block_k, _round_up(k.shape[2], SUBLANES))
  qh = _pad_to(q.transpose(0, 2, 1, 3), 2, bq)
  kh, vh = _pad_to(k, 2, bk), _pad_to(v, 2, bk)
  qseg = _pad_to(spans["q_segment"].astype(jnp.int32), 1, bq)
  qreach = _pad_to(spans["q_reach"].astype(jnp.int32), 1, bq)
  kseg = _pad_to(spans["k_segment"].astype(jnp.int32), 1, bk)
  qseg, qreach = (jnp.broadcast_to(x[:, :, None], x.shape + (LANES,)) for x in (qseg, qreach))
  kseg = jnp.broadcast_to(kseg[:, None, :], (kseg.shape[0], SUBLANES, kseg.shape[1]))

  def call(*args):
    return _flash(*args, _Blocks(bq, bk, interpret))

  mesh = _context_mesh()
  if mesh is not None and mesh.size > 1:
    # A Mosaic kernel is not partitioned by XLA: each device runs it on its own rows and heads.
    batch, heads, kv_heads = (
        nn.logical_to_mesh_axes((name,))[0] for name in ("activation_batch", "activation_heads", "activation_kv_heads")
    )
    # An axis the mesh does not divide (e.g. a sampler's few rows on a large slice) is replicated.
    batch = _dividing(batch, qh.shape[0], mesh)
    heads, kv_heads = _dividing(heads, qh.shape[1], mesh), _dividing(kv_heads, kh.shape[1], mesh)
    if heads is None or kv_heads is None:  # a device must hold whole query groups with their kv head
      heads = kv_heads = None
    rows = P(batch, None, None)
    call = jax.shard_map(
        call,
        mesh=mesh,
        in_specs=(
            P(batch, heads, None, None),
            P(batch, kv_heads, None, None),
            P(batch, kv_heads, None, None),
            rows,
            rows,
            rows,
        ),
        out_specs=P(batch, heads, None, None),
        check_vma=False,
    )
  out = call(qh, kh, vh, qseg, qreach, kseg)
  return out[:, :, :lq].transpose(0, 2, 1, 3)


def _dividing(axes, size: int, mesh):
  """`axes` (a mesh axis name, a tuple of them, or None) if their product divides `size`, else None."""
  names = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return axes if size % math.prod(mesh.shape[n] for n in names) == 0 else None


def _context_mesh():
  """The mesh the model is traced under: `jax.set_mesh`'s, or the `with mesh:` one the trainer and
  samplers enter (JAX keeps that only in its private thread resources)."""
  abstract = jax.sharding.get_abstract_mesh()
  if not abstract.empty:
    return abstract
  physical = jax_mesh.thread_resources.env.physical_mesh
  return None if physical.empty else physical


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple
