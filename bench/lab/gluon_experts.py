"""Warp-specialised expert matmuls in Gluon against the fused Triton kernels: an experiment, measured.

    python bench/lab/gluon_experts.py     # H100, about a minute

Hopper, bf16, Switch-Base's experts (D 768, F 3072, relu). The Triton kernels
(moeshard_compile/kernels/ffn_in.py, ffn_out.py) issue their TMA loads from the warps that run the MMAs,
so a tile's loads wait behind its MMAs and epilogue. Here one producer warp streams row and weight
tiles into a ring of shared-memory buffers, independently of the MMAs, and either
  pingpong     two consumer warpgroups take alternate [128, 128] tiles, so one's epilogue runs
               while the other multiplies (CUTLASS's ping-pong schedule), or
  cooperative  one consumer of two warpgroups takes each [128, 256] tile (the Triton kernels' tile).
The question it answers: does decoupling the loads let the sparse experts' weight streaming
overlap the crowded experts' MMAs under skewed routing? The rows, grouping and epilogues are the
Triton kernels' (ffn_in reads a copy of x[rows], since TMA cannot gather; the Triton default copies
too at F = 4 D, not on the f/4 shard), so every output must be bit-identical to theirs; the script
exits non-zero if one is not. Not used by the backend:
docs/performance.md has the numbers and why.

Gluon is Triton's experimental tile-level language (triton.experimental.gluon): it runs only on
the GPU (no interpreter), so CI compiles this kernel for sm_90 (tests/test_bench_smoke.py).
Names: R rows, E experts; per matmul a_RI @ w_EIO, I its inner (reduction) dim (INNER in the kernel)
and O its output columns (COLS): D and F in ffn_in, F and D in ffn_out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
from tabulate import tabulate
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `bench` importable when run as a script

# Triton 3.6 (the GPU image) names the TMA load async_copy_global_to_shared; later versions async_load.
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared

VARIANTS = {  # name: (consumers, block_cols, stages)
    "pingpong 2x[128,128] s4": (2, 128, 4),
    "pingpong 2x[128,128] s5": (2, 128, 5),
    "cooperative [128,256] s4": (1, 256, 4),
}
BLOCK_M, BLOCK_INNER = 128, 64
REGISTERS = 168  # per thread at launch: 12 warps x 32 x 168 fits the 64K register file; setmaxnreg moves them


@gluon.jit
def _add(a, b):
    return a + b


@gluon.jit
def _schedule(offs_ptr, R, E, BLOCK_M: gl.constexpr, E_POW2: gl.constexpr, WARPS: gl.constexpr):
    """Per expert (E_POW2 lanes of a WARPS-warp partition): first row, end row, M tiles, their running sum."""
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [WARPS], [0])
    e = gl.arange(0, E_POW2, layout=layout)
    ends = gl.minimum(gl.load(offs_ptr + e, mask=e < E, other=0).to(gl.int32), R)
    starts = gl.minimum(gl.load(offs_ptr + e - 1, mask=(e > 0) & (e < E), other=0).to(gl.int32), ends)
    tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M
    return e, starts, ends, tiles, gl.associative_scan(tiles, 0, _add)


@gluon.jit
def _tile(tile_id, e, starts, ends, tiles, tile_ends, COL_BLOCKS, BLOCK_M: gl.constexpr):
    """Tile tile_id's expert, first row, the expert's end row and column block (tile-major, as schedule._tile)."""
    tile = tile_id // COL_BLOCKS
    expert = gl.sum((tile_ends <= tile).to(gl.int32), 0)
    mine = e == expert
    first_tile = gl.sum(gl.where(mine, tile_ends - tiles, 0), 0)
    row_start = gl.sum(gl.where(mine, starts, 0), 0) + (tile - first_tile) * BLOCK_M
    return expert, row_start, gl.sum(gl.where(mine, ends, 0), 0), tile_id % COL_BLOCKS


@gluon.jit
def _load_partition(a_desc, w_desc, a_bufs, w_bufs, ready, empty, offs_ptr, R, E, INNER, COL_BLOCKS,
                    BLOCK_M: gl.constexpr, BLOCK_COLS: gl.constexpr, BLOCK_INNER: gl.constexpr, STAGES: gl.constexpr,
                    E_POW2: gl.constexpr):
    """One warp: every tile's row and weight slices, in order, into the ring as buffers free up."""
    e, starts, ends, tiles, tile_ends = _schedule(offs_ptr, R, E, BLOCK_M, E_POW2, 1)
    total = gl.sum(tiles, 0) * COL_BLOCKS
    step = 0
    for tile_id in range(gl.program_id(0), total, gl.num_programs(0)):
        expert, row_start, row_end, col_block = _tile(tile_id, e, starts, ends, tiles, tile_ends, COL_BLOCKS,
                                                      BLOCK_M)
        for inner_start in range(0, INNER, BLOCK_INNER):
            index = step % STAGES
            mbarrier.wait(empty.index(index), ((step // STAGES) & 1) ^ 1)
            bar = ready.index(index)
            mbarrier.expect(bar, a_desc.block_type.nbytes + w_desc.block_type.nbytes)
            _tma_load(a_desc, [row_start, inner_start], bar, a_bufs.index(index))
            _tma_load(w_desc, [expert * INNER + inner_start, col_block * BLOCK_COLS], bar, w_bufs.index(index))
            step += 1


@gluon.jit
def _mma_partition(CONSUMER: gl.constexpr, a_bufs, w_bufs, ready, empty, turns, offs_ptr, R, E, INNER, COLS,
                   COL_BLOCKS, scale_ptr, dest_ptr, out_ptr, stride_out, FFN_OUT: gl.constexpr,
                   BLOCK_M: gl.constexpr, BLOCK_COLS: gl.constexpr, BLOCK_INNER: gl.constexpr, STAGES: gl.constexpr,
                   E_POW2: gl.constexpr, CONSUMERS: gl.constexpr, WARPS: gl.constexpr):
    """Every CONSUMERS-th tile of the program: wgmma over the ring, then the epilogue, as the Triton kernels'
    (ffn_in: relu, rows in expert order; ffn_out: times the routing weight, rows back to token order)."""
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                         instr_shape=[16, BLOCK_COLS, 16])
    e, starts, ends, tiles, tile_ends = _schedule(offs_ptr, R, E, BLOCK_M, E_POW2, WARPS)
    total = gl.sum(tiles, 0) * COL_BLOCKS
    inner_steps = INNER // BLOCK_INNER
    turn = 0
    for tile_id in range(gl.program_id(0) + CONSUMER * gl.num_programs(0), total, CONSUMERS * gl.num_programs(0)):
        expert, row_start, row_end, col_block = _tile(tile_id, e, starts, ends, tiles, tile_ends, COL_BLOCKS,
                                                      BLOCK_M)
        if CONSUMERS == 2:
            # The consumers' main loops take turns, so that neither waits on a ring buffer's ready
            # barrier more than one phase ahead of its producer (a parity wait cannot tell them apart).
            if CONSUMER == 1:
                mbarrier.wait(turns.index(0), turn & 1)
            else:
                mbarrier.wait(turns.index(1), (turn + 1) & 1, pred=turn > 0)
        step = (CONSUMERS * turn + CONSUMER) * inner_steps
        acc = gl.zeros([BLOCK_M, BLOCK_COLS], gl.float32, mma_layout)
        for inner_step in range(inner_steps):
            index = step % STAGES
            mbarrier.wait(ready.index(index), (step // STAGES) & 1)
            acc = warpgroup_mma(a_bufs.index(index), w_bufs.index(index), acc, is_async=True)
            acc = warpgroup_mma_wait(1, deps=[acc])
            mbarrier.arrive(empty.index((step + STAGES - 1) % STAGES), pred=inner_step > 0)  # the previous MMA is done
            step += 1
        if CONSUMERS == 2:
            mbarrier.arrive(turns.index(CONSUMER))
        acc = warpgroup_mma_wait(0, deps=[acc])
        mbarrier.arrive(empty.index((step + STAGES - 1) % STAGES))
        turn += 1

        rows = row_start + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma_layout))
        cols = col_block * BLOCK_COLS + gl.arange(0, BLOCK_COLS, layout=gl.SliceLayout(0, mma_layout))
        row_mask = rows < row_end
        if FFN_OUT:
            scale = gl.expand_dims(gl.load(scale_ptr + rows, mask=row_mask, other=0.0).to(gl.float32), 1)
            acc = gl.where(scale != 0.0, acc * scale, 0.0)
            out_rows = gl.load(dest_ptr + rows, mask=row_mask, other=0).to(gl.int64)
        else:
            acc = gl.maximum(acc, 0.0)
            out_rows = rows.to(gl.int64)
        ptrs = out_ptr + gl.expand_dims(out_rows * stride_out, 1) + gl.expand_dims(cols, 0)
        mask = gl.expand_dims(row_mask, 1) & gl.expand_dims(cols < COLS, 0)
        gl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@gluon.jit
def grouped_mm_kernel(a_ptr, w_ptr, offs_ptr, scale_ptr, dest_ptr, out_ptr, R, E, INNER, COLS, COL_BLOCKS, stride_a,
                      stride_w_inner, stride_out, FFN_OUT: gl.constexpr, BLOCK_M: gl.constexpr,
                      BLOCK_COLS: gl.constexpr, BLOCK_INNER: gl.constexpr, STAGES: gl.constexpr, E_POW2: gl.constexpr,
                      CONSUMERS: gl.constexpr):
    """out = epilogue(a_RI[rows of expert e] @ w_EIO[e]) for expert-grouped rows, one program per SM."""
    dtype: gl.constexpr = a_ptr.dtype.element_ty
    WARPS: gl.constexpr = gl.num_warps()
    a_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_INNER], dtype)
    w_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_INNER, BLOCK_COLS], dtype)
    # Device-made descriptors (global scratch), as the Triton kernels'; weights seen as [E * INNER, COLS]
    # (INNER % BLOCK_INNER == 0)
    a_desc = tma.make_tensor_descriptor(a_ptr, shape=[R, INNER], strides=[stride_a, 1],
                                        block_shape=[BLOCK_M, BLOCK_INNER], layout=a_layout)
    w_desc = tma.make_tensor_descriptor(w_ptr, shape=[E * INNER, COLS], strides=[stride_w_inner, 1],
                                        block_shape=[BLOCK_INNER, BLOCK_COLS], layout=w_layout)
    a_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, BLOCK_INNER], a_layout)
    w_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_INNER, BLOCK_COLS], w_layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turns = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    for i in gl.static_range(2):
        mbarrier.init(turns.index(i), count=1)
    if CONSUMERS == 2:
        gl.warp_specialize([
            (_mma_partition, (0, a_bufs, w_bufs, ready, empty, turns, offs_ptr, R, E, INNER, COLS, COL_BLOCKS,
                              scale_ptr, dest_ptr, out_ptr, stride_out, FFN_OUT, BLOCK_M, BLOCK_COLS, BLOCK_INNER,
                              STAGES, E_POW2, CONSUMERS, WARPS)),
            (_mma_partition, (1, a_bufs, w_bufs, ready, empty, turns, offs_ptr, R, E, INNER, COLS, COL_BLOCKS,
                              scale_ptr, dest_ptr, out_ptr, stride_out, FFN_OUT, BLOCK_M, BLOCK_COLS, BLOCK_INNER,
                              STAGES, E_POW2, CONSUMERS, WARPS)),
            (_load_partition, (a_desc, w_desc, a_bufs, w_bufs, ready, empty, offs_ptr, R, E, INNER, COL_BLOCKS, BLOCK_M,
                               BLOCK_COLS, BLOCK_INNER, STAGES, E_POW2)),
        ], [WARPS, 1], [232, 40])
    else:
        gl.warp_specialize([
            (_mma_partition, (0, a_bufs, w_bufs, ready, empty, turns, offs_ptr, R, E, INNER, COLS, COL_BLOCKS,
                              scale_ptr, dest_ptr, out_ptr, stride_out, FFN_OUT, BLOCK_M, BLOCK_COLS, BLOCK_INNER,
                              STAGES, E_POW2, CONSUMERS, WARPS)),
            (_load_partition, (a_desc, w_desc, a_bufs, w_bufs, ready, empty, offs_ptr, R, E, INNER, COL_BLOCKS, BLOCK_M,
                               BLOCK_COLS, BLOCK_INNER, STAGES, E_POW2)),
        ], [1], [40])


def launch(a_RI: torch.Tensor, w_EIO: torch.Tensor, offs_E: torch.Tensor, out: torch.Tensor, variant: str,
           scale_R: torch.Tensor | None = None, dest_R: torch.Tensor | None = None) -> torch.Tensor:
    """ffn_in's matmul + relu (scale_R None) or ffn_out's matmul, scale and scatter, into out."""
    consumers, block_cols, stages = VARIANTS[variant]
    (R, inner), (E, _, cols) = a_RI.shape, w_EIO.shape
    if inner % BLOCK_INNER or not w_EIO.is_contiguous() or a_RI.stride(1) != 1:
        raise ValueError(f"needs an inner dim divisible by {BLOCK_INNER}, contiguous weights and rows; got {inner}")
    col_blocks = triton.cdiv(cols, block_cols)
    sm_count = torch.cuda.get_device_properties(a_RI.device).multi_processor_count
    grid = (min((R // BLOCK_M + E) * col_blocks, sm_count),)
    ffn_out = scale_R is not None
    grouped_mm_kernel[grid](
        a_RI, w_EIO, offs_E, scale_R if ffn_out else a_RI, dest_R if ffn_out else offs_E, out,
        R, E, inner, cols, col_blocks, a_RI.stride(0), w_EIO.stride(1), out.stride(0),
        FFN_OUT=ffn_out, BLOCK_M=BLOCK_M, BLOCK_COLS=block_cols, BLOCK_INNER=BLOCK_INNER, STAGES=stages,
        E_POW2=triton.next_power_of_2(E), CONSUMERS=consumers, num_warps=4 if consumers == 2 else 8,
        maxnreg=REGISTERS,
    )
    return out


def compile_for_sm90(variant: str, ffn_out: bool):
    """The kernel compiled for an H100 without one (CI's check that it still builds), specialised as a
    launch on Switch-Base's shapes would be."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    consumers, block_cols, stages = VARIANTS[variant]
    constexprs = dict(FFN_OUT=ffn_out, BLOCK_M=BLOCK_M, BLOCK_COLS=block_cols, BLOCK_INNER=BLOCK_INNER, STAGES=stages,
                      E_POW2=64, CONSUMERS=consumers)
    kernel = grouped_mm_kernel
    signature = {arg: "constexpr" if arg in constexprs else "*i64" if arg in ("offs_ptr", "dest_ptr")
                 else "*bf16" if arg.endswith("_ptr") else "i32" for arg in kernel.arg_names}
    aligned = {"INNER", "COLS", "stride_a", "stride_w_inner", "stride_out"}
    attrs = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(kernel.arg_names)
             if signature[arg].startswith("*") or arg in aligned}
    return triton.compile(GluonASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=4 if consumers == 2 else 8, maxnreg=REGISTERS))


def main(argv: list[str]) -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    from bench.baselines.routers import synthetic_routing
    from bench.common.environment import environment, environment_line
    from bench.common.timing import graph_replay_ms
    from bench.lab.expert_ceilings import DEVICE, E, F, ROWS, Experts, routing_parts

    torch.manual_seed(0)
    print(environment_line(environment(DEVICE)))
    ids_T1, _ = synthetic_routing("skew", ROWS, E, 1, seed=0, device=DEVICE)
    cases = {**{name: (counts_E, F) for name, counts_E in routing_parts().items()},
             "skew, f/4 shard": (torch.bincount(ids_T1.reshape(-1), minlength=E), F // 4)}
    table, mismatches = [], []
    for name, (counts_E, d_ff) in cases.items():
        experts = Experts(counts_E, d_ff)
        h_ref_RF, y_ref_RD = experts.ffn_in(), experts.ffn_out()
        row = [name, graph_replay_ms(experts.ffn_in), graph_replay_ms(experts.ffn_out)]
        for variant in VARIANTS:
            def ffn_in() -> torch.Tensor:
                return launch(experts.x_RD.index_select(0, experts.rows_R), experts.w_in_EDF, experts.offs_E,
                              torch.empty_like(h_ref_RF), variant)

            def ffn_out() -> torch.Tensor:
                return launch(experts.h_RF, experts.w_out_EFD, experts.offs_E, torch.empty_like(y_ref_RD), variant,
                              experts.scale_R, experts.rows_R)

            if not (torch.equal(ffn_in(), h_ref_RF) and torch.equal(ffn_out(), y_ref_RD)):
                mismatches.append(f"{name}: {variant}")
            row += [graph_replay_ms(ffn_in), graph_replay_ms(ffn_out)]
        table.append(row)
    headers = ["rows", "Triton ffn_in", "Triton ffn_out", *(f"{v} {k}" for v in VARIANTS for k in ("ffn_in", "ffn_out"))]
    print(tabulate(table, headers=headers, tablefmt="github", floatfmt=".4f"))
    if mismatches:
        sys.exit(f"outputs differ from the Triton kernels': {mismatches}")
    print("every output bit-identical to the Triton kernels'")


if __name__ == "__main__":
    main(sys.argv[1:])
