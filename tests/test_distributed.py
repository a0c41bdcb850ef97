"""MoEShard across real gloo ranks on CPU: every rank's compiled output equals its own eager output.

The `rank_*` functions run inside the ranks of a tests/rank_pool.py pool (one copy per rank, in
parallel); the `test_*` functions run in pytest's process, send them, and check what every rank
returned. In data_parallel mode each rank brings its own batch (seed + rank), in replicated mode
all bring the same one; either way each rank compares with `model(its batch)` computed eagerly.
"""

from __future__ import annotations

import re
import time

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

import hf_tiny
from rank_pool import RankPool
from helpers import assert_blocks_tile, assert_close_to_eager
from moe_zoo import MoEBlock, MoEConfig, moe_configs
from moeshard_compile import Options, Report
from moeshard_compile.backend import make_backend

FAULT_PG_TIMEOUT_S = 5  # the fault pool's process-group timeout: how long rank 0 may wait for rank 1
FAULT_MARGIN_S = 30  # on top of it: building and compiling the model before the collective blocks


# ---------------------------------------------------------------------- rank side


def _compile(model, report: Report, **options):
    """torch.compile with moeshard over the default group, recording into `report`."""
    opts = Options(**{"inductor": False, "world_size": dist.get_world_size(), **options})
    return torch.compile(model, backend=make_backend(opts, report), fullgraph=True)


def _model(cfg: MoEConfig, dtype: torch.dtype, seed: int = 0) -> MoEBlock:
    """The same weights on every rank: built from the same seed."""
    torch.manual_seed(seed)
    return MoEBlock(cfg).eval().to(dtype)


def _batch_BSD(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _input_seed(seed: int, input_mode: str) -> int:
    """data_parallel: every rank its own batch; replicated: the same batch everywhere."""
    return seed + dist.get_rank() if input_mode == "data_parallel" else seed


def _check_close(out: torch.Tensor, ref: torch.Tensor, report: Report) -> None:
    try:
        assert_close_to_eager(out, ref)
    except AssertionError as error:
        raise AssertionError(f"rank {dist.get_rank()}: {error}\n{report}") from None


def _sharded_regions(report: Report, input_mode: str, count: int | None = None) -> list[dict]:
    """Check the report of this rank's compilation; each region's (ffn_block, d_ff) for the parent.

    Every region is rewritten, sharded over the whole group in `input_mode`, and this rank holds
    exactly the columns its ffn_block names.
    """
    world = dist.get_world_size()
    regions = report.regions
    assert regions and all(r["status"] == "rewritten" for r in regions), f"not every region rewritten:\n{report}"
    assert count is None or len(regions) == count, f"expected {count} regions:\n{report}"
    for region in regions:
        assert (region["world_size"], region["input_mode"]) == (world, input_mode), f"not sharded as asked:\n{report}"
        start, stop = region["ffn_block"]
        assert 0 <= start < stop <= region["d_ff"], f"ffn_block {region['ffn_block']} outside d_ff={region['d_ff']}"
        first, last = region["experts_held"]
        assert 0 <= first < last <= region["num_experts"], f"experts held {first}:{last}"
        E, D, F_r = last - first, region["d_model"], stop - start
        shapes = region["shard_shapes"]
        assert shapes["w_in_EDF"] == [E, D, F_r] and shapes["w_out_EFD"] == [E, F_r, D], f"shards {shapes} != block {start}:{stop}"
    return [(region["ffn_block"], region["d_ff"], region["expert_group_size"], region["experts_held"],
             region["num_experts"]) for region in regions]


def rank_sharded_equals_eager(cfg: MoEConfig, dtype: torch.dtype, batch: int, seq: int, seed: int, input_mode: str,
                              schedule: dict):
    """One property example on this rank: (blocks, a checksum of this rank's batch)."""
    model = _model(cfg, dtype, seed)
    x_BSD = _batch_BSD((batch, seq, cfg.d_model), dtype, _input_seed(seed, input_mode))
    report = Report()
    with torch.no_grad():
        ref_BSD = model(x_BSD)
        out_BSD = _compile(model, report, input_mode=input_mode, **schedule)(x_BSD)
    _check_close(out_BSD, ref_BSD, report)
    return _sharded_regions(report, input_mode, count=1), x_BSD.double().sum().item()


def rank_degenerate_routing(skew: str, num_experts: int, top_k: int, schedule: dict):
    """Each dispatch spelling with every token on one expert ("hot") or most experts empty ("empty")."""
    for style in ("index", "mask", "dense"):
        torch._dynamo.reset()
        cfg = MoEConfig(num_experts=num_experts, top_k=top_k, d_ff=9, style=style, skew=skew)
        model = _model(cfg, torch.float64)
        x_BSD = _batch_BSD((2, 5, cfg.d_model), torch.float64, _input_seed(0, "data_parallel"))
        report = Report()
        with torch.no_grad():
            ids_TK, _, _ = model.moe.route(model.norm(x_BSD).reshape(-1, cfg.d_model))
            meant = (ids_TK[:, 0] == 0).all() if skew == "hot" else (ids_TK < top_k).all()
            assert meant, f"skew {skew!r} did not route as meant: {ids_TK.tolist()}"
            ref_BSD = model(x_BSD)
            out_BSD = _compile(model, report, **schedule)(x_BSD)
        _check_close(out_BSD, ref_BSD, report)
        _sharded_regions(report, "data_parallel", count=1)


def rank_disjoint_experts():
    """Rank 0's tokens all go to expert 0, rank 1's all to the last: no expert has rows on both."""
    cfg = MoEConfig(num_experts=4, top_k=1, d_model=8, d_ff=7, gated=True, bias=True)
    model = _model(cfg, torch.float64)
    direction_D = torch.tensor([1.0, -1.0] * (cfg.d_model // 2), dtype=torch.float64)  # mean 0: LayerNorm keeps it
    with torch.no_grad():
        model.moe.router.weight.zero_()
        model.moe.router.weight[0] = direction_D
        model.moe.router.weight[-1] = -direction_D
    sign = 1.0 if dist.get_rank() == 0 else -1.0
    x_BSD = sign * 3 * direction_D + 0.1 * _batch_BSD((2, 5, cfg.d_model), torch.float64, dist.get_rank())
    report = Report()
    with torch.no_grad():
        ids_TK, _, _ = model.moe.route(model.norm(x_BSD).reshape(-1, cfg.d_model))
        expected = 0 if dist.get_rank() == 0 else cfg.num_experts - 1
        assert (ids_TK == expected).all(), f"rank {dist.get_rank()} routed to {ids_TK.unique().tolist()}"
        ref_BSD = model(x_BSD)
        out_BSD = _compile(model, report)(x_BSD)
    _check_close(out_BSD, ref_BSD, report)
    return _sharded_regions(report, "data_parallel", count=1)


HF_MODELS = {  # name -> (builder, MoE layers)
    "switch": (lambda: hf_tiny.switch(expert_capacity=2), 2),
    "nllb_moe": (hf_tiny.nllb_moe, 3),
    "mixtral_grouped_mm": (lambda: hf_tiny.mixtral("grouped_mm"), 2),
    "mixtral_batched_mm": (lambda: hf_tiny.mixtral("batched_mm"), 2),
    "mixtral_eager": (lambda: hf_tiny.mixtral("eager"), 2),
    "qwen2_moe": (hf_tiny.qwen2_moe, 2),
}


def rank_hf_model(name: str, schedule: dict | None = None):
    """A tiny HF model, data_parallel: each rank its own token ids."""
    build, layers = HF_MODELS[name]
    torch.manual_seed(0)
    model = build().eval()
    kwargs = hf_tiny.inputs(model, batch=2, seq=6, seed=dist.get_rank())
    report = Report()
    with torch.no_grad():
        ref_BSD = model(**kwargs)[0]
        out_BSD = _compile(model, report, **(schedule or {}))(**kwargs)[0]
    _check_close(out_BSD, ref_BSD, report)
    forms = sorted({r["form"] for r in report.regions})
    return _sharded_regions(report, "data_parallel", count=layers), forms


def rank_through_inductor(schedule: dict):
    """The sharded graph (functional collectives included) lowered by Inductor, data_parallel."""
    cfg = MoEConfig(num_experts=4, top_k=2, d_model=8, d_ff=9, gated=True, bias=True, activation="silu")
    model = _model(cfg, torch.float64)
    x_BSD = _batch_BSD((2, 5, cfg.d_model), torch.float64, _input_seed(0, "data_parallel"))
    report = Report()
    with torch.no_grad():
        ref_BSD = model(x_BSD)
        out_BSD = _compile(model, report, inductor=True, **schedule)(x_BSD)
    _check_close(out_BSD, ref_BSD, report)
    return _sharded_regions(report, "data_parallel", count=1)


def rank_replicated_with_biases():
    """Replicated: the ranks' partial sums are all-reduced, so b_out must be added by one rank only."""
    cfg = MoEConfig(num_experts=4, top_k=2, d_model=8, d_ff=7, bias=True)
    model = _model(cfg, torch.float64)
    b_out_ED = torch.stack([expert.w_out.bias for expert in model.moe.expert_list()])
    assert b_out_ED.abs().max() > 0.05, "a b_out this small could be added twice unnoticed"
    x_BSD = _batch_BSD((3, 4, cfg.d_model), torch.float64, seed=0)
    report = Report()
    with torch.no_grad():
        ref_BSD = model(x_BSD)
        out_BSD = _compile(model, report, input_mode="replicated")(x_BSD)
    _check_close(out_BSD, ref_BSD, report)
    return _sharded_regions(report, "replicated", count=1), out_BSD.flatten().tolist()


def rank_release_unsharded():
    """After the first call the experts' own storage is gone; a new batch shape still computes right."""
    cfg = MoEConfig(num_experts=4, top_k=2, d_model=8, d_ff=9, gated=True, bias=True)
    model = _model(cfg, torch.float64)
    first_BSD = _batch_BSD((2, 5, cfg.d_model), torch.float64, _input_seed(0, "data_parallel"))
    second_BSD = _batch_BSD((3, 4, cfg.d_model), torch.float64, _input_seed(100, "data_parallel"))
    expert_params = list(model.moe.experts.parameters())
    other_params = [p for name, p in model.named_parameters() if ".experts." not in name]
    expert_bytes = sum(p.nbytes for p in expert_params)
    report = Report()
    with torch.no_grad():
        first_ref_BSD, second_ref_BSD = model(first_BSD), model(second_BSD)  # before compiling: afterwards eager cannot run
        compiled = _compile(model, report, release_unsharded=True)
        first_out_BSD = compiled(first_BSD)
        released = [p.untyped_storage().nbytes() == p.element_size() for p in expert_params]
        assert all(released), f"{released.count(False)} of {len(released)} expert parameters still hold storage"
        assert all(p.untyped_storage().nbytes() == p.nbytes for p in other_params), "a non-expert parameter was released"
        again_out_BSD = compiled(first_BSD)
        second_out_BSD = compiled(second_BSD)
    _check_close(first_out_BSD, first_ref_BSD, report)
    _check_close(again_out_BSD, first_ref_BSD, report)
    _check_close(second_out_BSD, second_ref_BSD, report)
    # the released parameters' new strides make Dynamo recompile once; the second shape once more
    assert report.graphs == 3, f"expected three graphs (first shape, after the release, second shape):\n{report}"
    blocks = _sharded_regions(report, "data_parallel", count=3)
    first = report.regions[0]
    start, stop = first["ffn_block"]
    E, D, F_r, itemsize = cfg.num_experts, cfg.d_model, stop - start, 8
    # w_in, w_gate [E, D, F_r], their biases [E, F_r], w_out [E, F_r, D]; b_out [E, D] is whole on every rank
    held = E * (2 * D * F_r + 2 * F_r + F_r * D + D) * itemsize
    assert (first["expert_bytes"], first["expert_bytes_per_rank"]) == (expert_bytes, held), report.regions
    return blocks, first["expert_bytes"], first["expert_bytes_per_rank"]


def rank_release_then_misuse() -> list[str]:
    """After the release, edits and reloads of the released parameters raise, and eager gives NaN."""
    cfg = MoEConfig(num_experts=4, top_k=2, d_model=8, d_ff=9)
    model = _model(cfg, torch.float64)
    x_BSD = _batch_BSD((2, 5, cfg.d_model), torch.float64, _input_seed(0, "data_parallel"))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    messages = []
    with torch.no_grad():
        _compile(model, Report(), release_unsharded=True)(x_BSD)
        weight = model.moe.experts[0].w_in.weight
        for misuse in (lambda: weight.mul_(2), lambda: weight.copy_(torch.ones_like(weight)),
                       lambda: model.load_state_dict(state)):
            try:
                misuse()
            except RuntimeError as error:
                messages.append(str(error))
            else:
                raise AssertionError("a write into a released parameter did not raise")
        assert torch.isnan(model(x_BSD)).all(), "an eager call with released experts must give NaN"
    return messages


def rank_different_batch_shapes() -> str:
    """Rank r calls with (2 + r, 5, D): the per-call shape check must raise on every rank. The same
    compiled model then serves equal batches, although the ranks now run different graphs
    (rank 1 recompiled with dynamic shapes for its rejected batch, rank 0 did not)."""
    cfg = MoEConfig(num_experts=4, top_k=2, d_model=8, d_ff=9)
    model = _model(cfg, torch.float64)
    report = Report()
    compiled = _compile(model, report)
    x_BSD = _batch_BSD((2, 5, cfg.d_model), torch.float64, seed=dist.get_rank())
    with torch.no_grad():
        compiled(x_BSD)  # every rank compiles its static graph for (2, 5, D)
        try:
            compiled(_batch_BSD((2 + dist.get_rank(), 5, cfg.d_model), torch.float64, seed=0))
        except ValueError as error:
            message = str(error)
        else:
            raise AssertionError("batches of different shapes were not rejected")
        _check_close(compiled(x_BSD), model(x_BSD), report)
    return message


def rank_one_rank_absent(absent_s: float):
    """Rank 1 never calls the compiled model; rank 0 must end with the group's timeout error."""
    if dist.get_rank() == 1:
        time.sleep(absent_s)
        return "stayed away"
    cfg = MoEConfig(num_experts=4, top_k=2, d_model=8, d_ff=9)
    model = _model(cfg, torch.float64)
    x_BSD = _batch_BSD((2, 5, cfg.d_model), torch.float64, seed=0)
    with torch.no_grad():
        _compile(model, Report(), check_inputs=False)(x_BSD)  # blocks in the graph's own all-gather
    raise AssertionError("rank 0 finished a sharded call that rank 1 never joined")


# ---------------------------------------------------------------------- parent side


# The data_parallel exchange's schedules: all-gather + reduce-scatter, in chunks, by source rank.
# Placements: MoEShard, expert groups of 1 (dropless expert parallelism) and 2, the cost model's.
SCHEDULES = ({}, {}, {"comm_chunks": 2}, {"comm_chunks": 3}, {"overlap": "source_rank"}, {"overlap": "source_rank"},
             {"expert_group_size": 1}, {"expert_group_size": 2}, {"expert_group_size": "auto"})


@st.composite
def sharded_cases(draw, world_size: int) -> dict:
    """A hand-written MoE, dtype, batch, seed and input mode; d_ff >= world_size, often not a multiple."""
    remainder = st.integers(0, world_size - 1) | st.integers(1, world_size - 1)  # mostly non-zero
    cfg = draw(moe_configs(d_ff=st.builds(lambda q, r: q * world_size + r, st.integers(1, 3), remainder)))
    return dict(
        cfg=cfg,
        dtype=draw(st.sampled_from([torch.float64, torch.float32, torch.float64, torch.float32, torch.bfloat16])),
        batch=draw(st.integers(1, 3)),
        seq=draw(st.integers(2, 7)),  # T >= 2: a one-token dense gated-relu layer is left unrewritten (a recogniser gap)
        seed=draw(st.integers(0, 2**16)),
        input_mode=(input_mode := draw(st.sampled_from(["data_parallel", "replicated"]))),
        schedule=draw(st.sampled_from([s for s in SCHEDULES if _fits(s, input_mode, cfg.num_experts, world_size)])),
    )


def _fits(schedule: dict, input_mode: str, num_experts: int, world_size: int) -> bool:
    """Schedules for data_parallel only, and expert groups with an expert for every group."""
    g = schedule.get("expert_group_size")
    if input_mode != "data_parallel":
        return not set(schedule) & {"overlap", "expert_group_size"}
    return not isinstance(g, int) or (world_size % g == 0 and num_experts >= world_size // g)


def check_sharded_case(pool: RankPool, case: dict) -> None:
    """Every rank equals its eager output (checked on the rank); here: blocks tile, batches as the mode says."""
    results = pool.run(rank_sharded_equals_eager, **case)
    blocks_by_rank, batch_sums = zip(*results)
    assert_blocks_tile(list(blocks_by_rank))
    distinct = len(set(batch_sums))
    assert distinct == (pool.world_size if case["input_mode"] == "data_parallel" else 1), batch_sums


@settings(max_examples=20)
@given(case=sharded_cases(world_size=2))
def test_sharded_equals_eager_world_2(world_2, case):
    """Any hand-written MoE, sharded over 2 ranks, equals eager on every rank."""
    check_sharded_case(world_2, case)


@settings(max_examples=10)
@given(case=sharded_cases(world_size=4))
def test_sharded_equals_eager_world_4(world_4, case):
    """Over 4 ranks: blocks of 1 column and uneven blocks (d_ff = 4..15)."""
    check_sharded_case(world_4, case)


@pytest.mark.parametrize(("skew", "num_experts", "top_k", "schedule"),
                         [("hot", 6, 2, {}), ("empty", 8, 2, {}), ("hot", 6, 2, {"comm_chunks": 3}),
                          ("hot", 6, 2, {"overlap": "source_rank"}), ("empty", 8, 2, {"expert_group_size": 1})])
def test_degenerate_routing(world_2, skew, num_experts, top_k, schedule):
    """Experts with no rows on any rank still take part in the collectives with empty groups;
    in chunks, a chunk may hold one expert's rows only; by source rank, a step's rows may all
    belong to one expert or to none this rank has rows for; in expert groups, a group may
    receive every row or none."""
    world_2.run(rank_degenerate_routing, skew=skew, num_experts=num_experts, top_k=top_k, schedule=schedule)


@pytest.mark.parametrize("skew", ["hot", "empty"])
@pytest.mark.parametrize("schedule", [{"overlap": "source_rank"}, {"expert_group_size": 1}, {"expert_group_size": 2}],
                         ids=["source_rank", "groups_of_1", "groups_of_2"])
def test_schedules_and_placements_world_4(world_4, skew, schedule):
    """Three pairwise steps a rank, and expert groups of 1 and 2 ranks: every row and partial
    sum reaches the right rank, with one hot expert or most experts empty."""
    world_4.run(rank_degenerate_routing, skew=skew, num_experts=8, top_k=2, schedule=schedule)


@settings(max_examples=3, deadline=None)
@given(case=sharded_cases(world_size=8))
def test_sharded_equals_eager_world_8(world_8, case):
    """Over 8 ranks: every placement that divides them (g = 1, 2, 8 and the cost model's)."""
    check_sharded_case(world_8, case)


def test_ranks_route_to_disjoint_experts(world_2):
    """The all-gathered rows regroup by expert across ranks, with most experts empty everywhere."""
    assert_blocks_tile(world_2.run(rank_disjoint_experts))


@pytest.mark.parametrize(
    ("name", "form"),
    [
        ("switch", "module_loop/index"),
        ("nllb_moe", "module_loop/index"),
        ("mixtral_grouped_mm", "stacked/grouped_mm"),
        ("mixtral_batched_mm", "stacked/batched_mm"),
        ("mixtral_eager", "stacked/eager"),
        ("qwen2_moe", "stacked/grouped_mm"),
    ],
)
def test_hf_model_data_parallel(world_2, name, form):
    """Unmodified HF models: Switch's per-expert loop with capacity drops, NLLB-MoE's encoder and
    decoder prefill, transformers' stacked experts under every implementation, Qwen2's shared expert."""
    blocks_by_rank, forms_by_rank = zip(*world_2.run(rank_hf_model, name=name))
    assert all(forms == [form] for forms in forms_by_rank), forms_by_rank
    assert_blocks_tile(list(blocks_by_rank))


@pytest.mark.parametrize(("name", "schedule"), [("switch", {"expert_group_size": 1}),
                                              ("mixtral_grouped_mm", {"expert_group_size": "auto"})])
def test_hf_model_expert_groups(world_2, name, schedule):
    """Switch's capacity drops and Mixtral's stacked experts in expert groups; with the cost
    model, both ranks place every layer alike (assert_blocks_tile compares their g)."""
    blocks_by_rank, _ = zip(*world_2.run(rank_hf_model, name=name, schedule=schedule))
    assert_blocks_tile(list(blocks_by_rank))


@pytest.mark.parametrize("schedule", [{}, {"comm_chunks": 2}, {"overlap": "source_rank"}, {"expert_group_size": 1}])
def test_inductor_data_parallel(world_2, schedule):
    """Inductor lowers the functional collectives and the grouped op together (in chunks, by
    source rank, and around expert groups' opaque exchange too)."""
    assert_blocks_tile(world_2.run(rank_through_inductor, schedule=schedule))


def test_replicated_adds_output_bias_once(world_2):
    """A b_out added on both ranks would be off by tenths: far above float64's tolerance."""
    blocks_by_rank, outputs_by_rank = zip(*world_2.run(rank_replicated_with_biases))
    assert_blocks_tile(list(blocks_by_rank))
    assert outputs_by_rank[0] == outputs_by_rank[1], "replicated ranks computed different outputs"


def test_release_unsharded(world_2):
    """Each rank keeps about 1/N of the expert bytes, and the compiled model runs on without the originals."""
    blocks_by_rank, expert_bytes, bytes_per_rank = zip(*world_2.run(rank_release_unsharded))
    assert_blocks_tile(list(blocks_by_rank))
    for held in bytes_per_rank:  # about 1/N: the whole b_out stays on every rank, 9 columns split 5 + 4
        assert abs(held / expert_bytes[0] - 1 / world_2.world_size) < 0.1, (held, expert_bytes)


def test_released_parameters_refuse_writes(world_2):
    """No write reaches freed memory: each raises torch's error for a broadcast tensor."""
    for messages in world_2.run(rank_release_then_misuse):
        assert len(messages) == 3 and all("single memory location" in m for m in messages), messages


def test_different_batch_shapes_raise_on_every_rank(world_2):
    """Unequal batches would crash gloo (a size mismatch aborts the process): every rank must raise
    instead, and equal batches must run afterwards."""
    for message in world_2.run(rank_different_batch_shapes, timeout_s=60):
        assert "[2, 5, 8]" in message and "[3, 5, 8]" in message, message


def test_failing_rank_ends_the_others_within_the_timeout():
    """A rank that never joins makes the others fail after the group's timeout: no hang."""
    pool = RankPool(world_size=2, pg_timeout_s=FAULT_PG_TIMEOUT_S)
    try:
        absent_s = FAULT_PG_TIMEOUT_S + 3
        waiting, absent = pool.run_outcomes(rank_one_rank_absent, timeout_s=absent_s + FAULT_MARGIN_S + 30, absent_s=absent_s)
    finally:
        pool.close(graceful=False)  # rank 0's connection to rank 1 is broken: the pool is of no further use
    assert absent.ok and absent.value == "stayed away", absent
    assert waiting.raised("RuntimeError"), f"rank 0: {waiting.error or 'no error'}: {waiting.message}\n{waiting.traceback}"
    # the collective's timeout, not another error; gloo says "... timed out" or, with a second
    # collective already issued (the counts and rows all-gathers go out together), "Application
    # timeout caused pair closure"
    assert re.search(r"timed out|timeout", waiting.message.lower()), waiting.message
    assert FAULT_PG_TIMEOUT_S <= waiting.elapsed_s <= FAULT_PG_TIMEOUT_S + FAULT_MARGIN_S, waiting.elapsed_s
