"""The sharded graph's structure, on one process with a fake process group of 8 ranks.

The fake group lets one process trace and rewrite exactly as rank 3 of 8 would; its collectives
carry no data, so the rewritten graphs are inspected, not run (the gloo tests run them).
"""

import operator

import pytest
import torch
import torch.distributed as dist
import torch.fx as fx
from torch.testing._internal.distributed.fake_pg import FakeStore

import hf_tiny
import moeshard_compile
from moe_zoo import MoEBlock, MoEConfig
from moeshard_compile.passes.shard import ffn_block

WORLD, RANK = 8, 3
c10d = torch.ops._c10d_functional
ALL_GATHER, REDUCE_SCATTER = c10d.all_gather_into_tensor.default, c10d.reduce_scatter_tensor.default
ALL_REDUCE, WAIT, ALL_TO_ALL = c10d.all_reduce.default, c10d.wait_tensor.default, c10d.all_to_all_single.default
FFN_IN = torch.ops.moeshard.gather_grouped_ffn_in.default
FFN_OUT = torch.ops.moeshard.grouped_ffn_out_scatter.default
ALL_TO_ALL_ROWS = torch.ops.moeshard.all_to_all_rows.default


@pytest.fixture
def fake_world():
    dist.init_process_group("fake", store=FakeStore(), rank=RANK, world_size=WORLD)
    yield
    dist.destroy_process_group()


def sharded_graphs(model, *args, **kwargs) -> tuple[list[fx.GraphModule], moeshard_compile.Report]:
    """Rewrite every Dynamo graph as rank RANK would; run the original graphs instead."""
    options = {"inductor": False, **kwargs.pop("options", {})}
    report = moeshard_compile.Report()
    moeshard = moeshard_compile.backend.make_backend(moeshard_compile.Options.from_user(options), report)

    def backend(gm, example_inputs):
        moeshard(gm, example_inputs)
        return gm.forward

    backend._moeshard = True
    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True)(*args, **kwargs)
    return report.rewritten_graphs, report


def count(gm: fx.GraphModule, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.target == target)


@pytest.mark.parametrize("num_experts", [2, 16])
def test_data_parallel_inserts_two_gathers_one_reduce_scatter_per_layer(fake_world, num_experts):
    """A fixed number of collectives per MoE layer, whatever the number of experts."""
    cfg = MoEConfig(num_experts=num_experts, top_k=2, d_ff=24, gated=True)
    (gm,), report = sharded_graphs(MoEBlock(cfg).eval(), torch.randn(2, 5, cfg.d_model))
    assert [r["status"] for r in report.regions] == ["rewritten"]
    assert (count(gm, ALL_GATHER), count(gm, REDUCE_SCATTER), count(gm, ALL_REDUCE), count(gm, WAIT)) == (2, 1, 0, 3)
    assert (count(gm, FFN_IN), count(gm, FFN_OUT)) == (1, 1)
    gathered = [n.args[0].name for n in gm.graph.nodes if n.target == ALL_GATHER]
    assert gathered == ["moe0_counts_CE", "moe0_x_SD"]  # counts, then the expert-sorted tokens
    for node in gm.graph.nodes:
        if node.target in (ALL_GATHER, REDUCE_SCATTER):
            assert WORLD in node.args and dist.group.WORLD.group_name in node.args


def positions(gm: fx.GraphModule, target) -> list[int]:
    return [i for i, n in enumerate(gm.graph.nodes) if n.target == target]


@pytest.mark.parametrize(("rows", "chunks", "sizes"), [(10 * 2, 3, [7, 7, 6]), (2 * 2, 8, [1, 1, 1, 1])])
def test_comm_chunks_issue_every_gather_before_computing(fake_world, rows, chunks, sizes):
    """C chunks: one counts gather, C row gathers all issued before the first chunk computes,
    and each chunk's reduce-scatter issued before the next chunk computes (at most one chunk per row)."""
    cfg = MoEConfig(num_experts=4, top_k=2, d_ff=24)
    (gm,), _ = sharded_graphs(MoEBlock(cfg).eval(), torch.randn(1, rows // 2, cfg.d_model),
                              options={"comm_chunks": chunks})
    C = len(sizes)
    assert (count(gm, ALL_GATHER), count(gm, REDUCE_SCATTER), count(gm, FFN_IN), count(gm, FFN_OUT)) == (1 + C, C, C, C)
    ffn_in, scatters = positions(gm, FFN_IN), positions(gm, REDUCE_SCATTER)
    assert max(positions(gm, ALL_GATHER)) < ffn_in[0]
    assert all(scatters[c] < ffn_in[c + 1] for c in range(C - 1))
    split = next(n for n in gm.graph.nodes if n.target is torch.split and n.name.startswith("moe0_x_SD"))
    assert split.args[1] == sizes


@pytest.mark.parametrize("bias", [False, True])
def test_source_rank_overlap_exchanges_with_one_peer_a_step(fake_world, bias):
    """overlap="source_rank": one counts gather and N - 1 pairwise exchanges of rows, all issued
    before this rank's own rows compute; step j sends to rank r + j and receives from r - j, and its
    partial sums go back to r - j before step j + 1 computes. No all-gather of rows, no reduce-scatter."""
    cfg = MoEConfig(num_experts=4, top_k=2, d_ff=24, bias=bias)
    T = 2 * 5
    (gm,), report = sharded_graphs(MoEBlock(cfg).eval(), torch.randn(2, 5, cfg.d_model),
                                   options={"overlap": "source_rank"})
    assert [r["status"] for r in report.regions] == ["rewritten"]
    assert (count(gm, ALL_GATHER), count(gm, ALL_TO_ALL), count(gm, REDUCE_SCATTER)) == (1, 2 * (WORLD - 1), 0)
    assert (count(gm, FFN_IN), count(gm, FFN_OUT)) == (WORLD, WORLD)  # this rank's rows, then each other rank's
    exchanges = [n for n in gm.graph.nodes if n.target == ALL_TO_ALL]
    rows = T * cfg.top_k
    one_peer = lambda peer: [rows if p == peer else 0 for p in range(WORLD)]  # noqa: E731
    for j, (forward, back) in enumerate(zip(exchanges[:WORLD - 1], exchanges[WORLD - 1:]), start=1):
        to, source = (RANK + j) % WORLD, (RANK - j) % WORLD
        assert forward.args[0].name == "moe0_x_SD"
        assert (forward.args[1], forward.args[2]) == (one_peer(source), one_peer(to))  # (output, input) splits
        assert (back.args[1], back.args[2]) == (one_peer(to), one_peer(source))
    at = {n: i for i, n in enumerate(gm.graph.nodes)}
    ffn_in, returns = positions(gm, FFN_IN), [at[n] for n in exchanges[WORLD - 1:]]
    assert max(at[n] for n in exchanges[:WORLD - 1]) < ffn_in[0]
    assert all(returns[j] < ffn_in[j + 2] for j in range(WORLD - 2))


@pytest.mark.parametrize(("g", "experts_held", "ffn_block"), [(2, [2, 4], [12, 24]), (1, [3, 4], [0, 24])])
def test_expert_groups_exchange_rows_by_group(fake_world, g, experts_held, ffn_block):
    """expert_group_size g: rank 3 of 8 holds its group's block of experts and FFN block
    3 % g of g; one counts all-gather and two variable all-to-alls (rows out, partial sums
    back) replace MoEShard's all-gather and reduce-scatter, sized for the worst routing
    (N*S rows received) and the exact return (g*S rows)."""
    cfg = MoEConfig(num_experts=8, top_k=2, d_ff=24, gated=True, bias=True)
    (gm,), report = sharded_graphs(MoEBlock(cfg).eval(), torch.randn(2, 5, cfg.d_model),
                                   options={"expert_group_size": g})
    (row,) = report.regions
    assert (row["status"], row["expert_group_size"], row["experts_held"], row["ffn_block"]) == (
        "rewritten", g, experts_held, ffn_block)
    E_held, F_held = experts_held[1] - experts_held[0], ffn_block[1] - ffn_block[0]
    assert row["shard_shapes"]["w_in_EDF"] == [E_held, cfg.d_model, F_held]
    assert row["shard_shapes"]["b_out_ED"] == [cfg.num_experts, cfg.d_model]  # added after the sum, by expert
    assert (count(gm, ALL_GATHER), count(gm, ALL_TO_ALL_ROWS), count(gm, REDUCE_SCATTER)) == (1, 2, 0)
    assert (count(gm, FFN_IN), count(gm, FFN_OUT)) == (1, 1)
    rows = 2 * 5 * cfg.top_k
    forward, back = [n for n in gm.graph.nodes if n.target == ALL_TO_ALL_ROWS]
    assert (forward.args[3], back.args[3]) == (WORLD * rows, g * rows)
    assert f"experts {experts_held[0]}:{experts_held[1]}" in report.table()


def test_comm_chunks_leave_replicated_alone(fake_world):
    cfg = MoEConfig(num_experts=4, top_k=2, d_ff=24)
    (gm,), _ = sharded_graphs(MoEBlock(cfg).eval(), torch.randn(2, 5, cfg.d_model),
                              options={"comm_chunks": 4, "input_mode": "replicated"})
    assert (count(gm, ALL_GATHER), count(gm, ALL_REDUCE), count(gm, FFN_IN)) == (0, 1, 1)


def test_replicated_inserts_one_all_reduce_per_layer(fake_world):
    cfg = MoEConfig(num_experts=4, top_k=2, d_ff=24, bias=True)
    (gm,), report = sharded_graphs(MoEBlock(cfg).eval(), torch.randn(2, 5, cfg.d_model), options={"input_mode": "replicated"})
    assert report.regions[0]["input_mode"] == "replicated"
    assert (count(gm, ALL_GATHER), count(gm, REDUCE_SCATTER), count(gm, ALL_REDUCE), count(gm, WAIT)) == (0, 0, 1, 1)
    # the second bias is added on rank 0 only: rank 3's graph reads no b_out
    assert not [n for n in gm.graph.nodes if n.op == "placeholder" and n.name.endswith("b_out_ed") and n.users]


def test_uneven_ffn_blocks_and_shard_shapes(fake_world):
    """d_ff 20 over 8 ranks: blocks of 3, 3, 3, 3, 2, 2, 2, 2; rank 3 holds columns 9:12."""
    cfg = MoEConfig(num_experts=5, top_k=1, d_model=8, d_ff=20, gated=True, bias=True)
    _, report = sharded_graphs(MoEBlock(cfg).eval(), torch.randn(1, 4, cfg.d_model))
    (region,) = report.regions
    assert (region["world_size"], region["ffn_block"]) == (WORLD, [9, 12])
    assert region["shard_shapes"] == {
        "w_in_EDF": [5, 8, 3], "w_gate_EDF": [5, 8, 3], "b_in_EF": [5, 3], "b_gate_EF": [5, 3],
        "w_out_EFD": [5, 3, 8], "b_out_ED": [5, 8],
    }
    blocks = [ffn_block(20, r, WORLD) for r in range(WORLD)]
    assert [b - a for a, b in blocks] == [3, 3, 3, 3, 2, 2, 2, 2]
    assert all(blocks[r][1] == blocks[r + 1][0] for r in range(WORLD - 1)) and blocks[-1][1] == 20


def test_expert_bytes_per_rank_are_one_nth(fake_world):
    cfg = MoEConfig(num_experts=4, top_k=2, d_ff=64, gated=True)
    _, report = sharded_graphs(MoEBlock(cfg).eval(), torch.randn(2, 3, cfg.d_model))
    (region,) = report.regions
    assert region["expert_bytes"] == 4 * 3 * 8 * 64 * 4  # E x (in, gate, out) x D x F x fp32
    assert region["expert_bytes_per_rank"] == region["expert_bytes"] // WORLD


def test_switch_encoder_and_stacked_mixtral(fake_world):
    switch = hf_tiny.switch().eval()
    (gm,), report = sharded_graphs(switch, **hf_tiny.inputs(switch))
    assert [r["status"] for r in report.regions] == ["rewritten"] * 2
    assert (count(gm, ALL_GATHER), count(gm, REDUCE_SCATTER)) == (4, 2)
    torch._dynamo.reset()
    mixtral = hf_tiny.mixtral("grouped_mm").eval()
    (gm,), report = sharded_graphs(mixtral, **hf_tiny.inputs(mixtral))
    assert [r["ffn_block"] for r in report.regions] == [list(ffn_block(24, RANK, WORLD))] * 2
    assert report.regions[0]["shard_shapes"]["w_in_EDF"] == [4, 16, 3]
    assert (count(gm, ALL_GATHER), count(gm, REDUCE_SCATTER), count(gm, FFN_IN), count(gm, FFN_OUT)) == (4, 2, 2, 2)


def test_group_and_mesh_options(fake_world):
    from torch.distributed.device_mesh import init_device_mesh

    cfg = MoEConfig(num_experts=3, top_k=1, d_ff=16)
    x = torch.randn(1, 4, cfg.d_model)
    _, report = sharded_graphs(MoEBlock(cfg).eval(), x, options={"group": dist.group.WORLD, "world_size": WORLD})
    assert report.regions[0]["world_size"] == WORLD
    torch._dynamo.reset()
    _, report = sharded_graphs(MoEBlock(cfg).eval(), x, options={"mesh": init_device_mesh("cpu", (WORLD,))})
    assert report.regions[0]["world_size"] == WORLD


def test_model_without_moe_gets_no_collectives(fake_world):
    model = hf_tiny.bert().eval()
    (gm,), report = sharded_graphs(model, **hf_tiny.inputs(model))
    assert report.regions == []
    assert not [n for n in gm.graph.nodes if getattr(n.target, "namespace", None) == "_c10d_functional"]


# --- errors: raised identically on every rank, before any collective ----------------------------


def _compile_and_call(options, cfg=MoEConfig(num_experts=3, top_k=1, d_ff=16)):
    with torch.no_grad():
        torch.compile(MoEBlock(cfg).eval(), backend="moeshard", fullgraph=True, options={"inductor": False, **options})(
            torch.randn(1, 4, cfg.d_model)
        )


def test_world_size_not_matching_the_group(fake_world):
    with pytest.raises(ValueError, match=r"world_size=4 does not match the default group, which has 8 ranks"):
        _compile_and_call({"world_size": 4})


@pytest.mark.parametrize(("options", "message"), [
    ({"expert_group_size": 3}, "expert_group_size=3 does not divide the 8 ranks"),
    ({"expert_group_size": 2, "overlap": "source_rank"}, "overlap and comm_chunks schedule MoEShard's exchange"),
    ({"expert_group_size": 1}, "makes 8 expert groups, more than the 3 experts"),
])
def test_expert_groups_that_cannot_be_placed(fake_world, options, message):
    with pytest.raises(ValueError, match=message):
        _compile_and_call(options)


def test_world_size_larger_than_ffn(fake_world):
    with pytest.raises(ValueError, match=r"world_size=8 is larger than the FFN size d_ff=4 of the experts in moe\.experts"):
        _compile_and_call({}, MoEConfig(num_experts=3, top_k=1, d_ff=4))


def test_world_size_without_initialised_group():
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match=r"world_size=2 but torch.distributed is not initialised"):
        _compile_and_call({"world_size": 2})


@pytest.mark.parametrize(
    "options, message",
    [
        ({"world_size": 0}, "'world_size' must be a positive int"),
        ({"world_size": True}, "'world_size' must be a positive int"),
        ({"input_mode": "tensor_parallel"}, "'input_mode' must be one of 'data_parallel', 'replicated'"),
        ({"group": "world"}, "'group' must be a torch.distributed.ProcessGroup"),
        ({"mesh": object()}, "'mesh' must be a 1-D torch.distributed.DeviceMesh"),
        ({"release_unsharded": 1}, "'release_unsharded' must be True or False"),
        ({"check_inputs": "no"}, "'check_inputs' must be True, False or None"),
        ({"expert_group_size": 0}, "'expert_group_size' must be None, 'auto' or a positive int"),
        ({"expert_group_size": 2, "input_mode": "replicated"}, "input_mode 'replicated' shards every expert"),
    ],
)
def test_bad_distributed_options(options, message):
    with pytest.raises(ValueError, match=message):
        moeshard_compile.Options.from_user(options)


def test_two_dimensional_mesh_is_refused(fake_world):
    from torch.distributed.device_mesh import init_device_mesh

    with pytest.raises(ValueError, match="1-D"):
        moeshard_compile.Options.from_user({"mesh": init_device_mesh("cpu", (2, 4))})


def test_group_and_mesh_together_are_refused(fake_world):
    from torch.distributed.device_mesh import init_device_mesh

    with pytest.raises(ValueError, match="either option 'group' or option 'mesh'"):
        moeshard_compile.Options.from_user({"group": dist.group.WORLD, "mesh": init_device_mesh("cpu", (WORLD,))})


def test_input_signature_sees_shapes_past_its_readable_head():
    """The per-call check compares a fixed-size signature: a difference in the 40th input still counts."""
    from moeshard_compile.distributed import _describe, _signature

    shapes = [(i, 3) for i in range(40)]
    changed = shapes[:-1] + [(39, 4)]
    assert len(_signature(shapes, 50)) == len(_signature([(2, 5, 8)], 50)) == 50
    assert _signature(shapes, 50) != _signature(changed, 50)
    assert _describe(_signature([(2, 5, 8), (7,)], 50)) == "[2, 5, 8], [7]"
    assert _describe(_signature(shapes, 50)).endswith("...")


def _inductor_op_calls(**options):
    """The op calls in Inductor's output code for a small MoE block sharded with `options`, and
    a function giving the positions of the calls of one op."""
    from torch._inductor.utils import run_and_get_code

    cfg = MoEConfig(num_experts=8, top_k=1, d_model=16, d_ff=64)
    backend = moeshard_compile.backend.make_backend(moeshard_compile.Options(check_inputs=False, **options),
                                                    moeshard_compile.Report())
    with torch.no_grad():
        _, codes = run_and_get_code(torch.compile(MoEBlock(cfg).eval(), backend=backend, fullgraph=True),
                                    torch.randn(2, 12, cfg.d_model))
    calls = [line.strip() for line in codes[-1].splitlines() if "= torch.ops." in line]
    return calls, lambda op: [i for i, line in enumerate(calls) if op in line]


def test_inductor_keeps_the_chunks_overlapped(fake_world):
    """In Inductor's output code every row all-gather is issued before the first chunk computes and
    each reduce-scatter before the next chunk: its peak-memory reordering would serialise them."""
    calls, at = _inductor_op_calls(comm_chunks=3)
    gathers, ffn_in, scatters = at("all_gather_into_tensor"), at("gather_grouped_ffn_in"), at("reduce_scatter_tensor")
    assert (len(gathers), len(ffn_in), len(scatters)) == (4, 3, 3), calls
    assert max(gathers) < ffn_in[0], calls
    assert scatters[0] < ffn_in[1] and scatters[1] < ffn_in[2], calls


def test_inductor_keeps_the_source_rank_exchanges_overlapped(fake_world):
    """In Inductor's output code every rank's rows are sent before this rank's own rows compute,
    and each step's partial sums go back before the next step computes."""
    calls, at = _inductor_op_calls(overlap="source_rank")
    exchanges, ffn_in = at("all_to_all_single"), at("gather_grouped_ffn_in")
    assert (len(exchanges), len(ffn_in), len(at("reduce_scatter_tensor"))) == (2 * (WORLD - 1), WORLD, 0), calls
    assert max(exchanges[:WORLD - 1]) < ffn_in[0], calls
    assert all(exchanges[WORLD - 1 + j] < ffn_in[j + 2] for j in range(WORLD - 2)), calls


def test_inductor_calls_the_expert_group_exchange_around_the_experts(fake_world):
    """In Inductor's output code: the counts all-gathered, the rows exchanged before the first
    matmul, the partial sums after the second; no reduce-scatter."""
    calls, at = _inductor_op_calls(expert_group_size=2)
    gathers, exchanges = at("all_gather_into_tensor"), at("all_to_all_rows")
    ffn_in, ffn_out = at("gather_grouped_ffn_in"), at("grouped_ffn_out_scatter")
    assert (len(gathers), len(exchanges), len(ffn_in), len(at("reduce_scatter_tensor"))) == (1, 2, 1, 0), calls
    assert gathers[0] < exchanges[0] < ffn_in[0] and ffn_out[0] < exchanges[1], calls


def test_grouped_mm_asked_for_on_several_ranks_keeps_the_fused_ops_and_says_why(fake_world):
    cfg = MoEConfig(num_experts=4, top_k=2, d_ff=64, gated=True)
    model = MoEBlock(cfg).eval().to(torch.bfloat16)
    (gm,), report = sharded_graphs(model, torch.randn(2, 5, cfg.d_model, dtype=torch.bfloat16),
                                   options={"expert_kernel": "grouped_mm"})
    assert [(r["status"], r["kernel"]) for r in report.regions] == [("rewritten", "fused (grouped_mm: one rank only)")]
    assert (count(gm, FFN_IN), count(gm, FFN_OUT)) == (1, 1)
