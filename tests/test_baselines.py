"""The benchmark baselines (bench/baselines): routers, and expert parallelism over real gloo ranks.

Both expert-parallel layers are checked against a float64 single-device MoE written here
independently (a per-slot gather of whole expert matrices), on every rank's own batch; the
capacity layer also against a token-by-token reading of DeepSpeed's capacity rule. The `rank_*`
functions run on every rank of a tests/rank_pool.py pool and assert there; the `test_*` functions
send them and check what the ranks returned (as in tests/test_distributed.py).
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `bench` from any cwd, ranks too

from bench.baselines import (  # noqa: E402
    CapacityExpertParallelMoE,
    DroplessExpertParallelMoE,
    deepspeed_capacity,
    load_summary,
    model_routing,
    skew_probs,
    synthetic_routing,
    zipf_probs,
)
from rank_pool import RankPool  # noqa: E402

D, F = 6, 5  # small expert shapes: the tests are about routing and collectives, not matmul speed
ROUTINGS = ("uniform", "skew", "hot", "empty")
PG_TIMEOUT_S = 15  # a rank that fails before a collective strands the others this long, not the default 60 s


@pytest.fixture(scope="module")
def world_2():
    """One pool per module: starting ranks costs seconds."""
    pool = RankPool(world_size=2, pg_timeout_s=PG_TIMEOUT_S)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def world_4():
    """4 ranks on 2 cores: one expert per rank at E = 4, three ranks that send to rank 0 at once."""
    pool = RankPool(world_size=4, pg_timeout_s=PG_TIMEOUT_S)
    yield pool
    pool.close()


# ---------------------------------------------------------------------- the references


def reference_moe(x_TD, ids_TK, weight_TK, w_in_EDF, w_out_EFD) -> torch.Tensor:
    """sum_k weight * relu(x @ W_in[e]) @ W_out[e] in float64, one token slot at a time."""
    x_SD = x_TD.double().repeat_interleave(ids_TK.shape[1], dim=0)
    ids_S = ids_TK.reshape(-1)
    h_SF = torch.relu(torch.einsum("sd,sdf->sf", x_SD, w_in_EDF.double()[ids_S]))
    y_SD = torch.einsum("sf,sfd->sd", h_SF, w_out_EFD.double()[ids_S]) * weight_TK.double().reshape(-1, 1)
    return y_SD.view(*ids_TK.shape, x_TD.shape[1]).sum(1)


def deepspeed_kept(ids_T: torch.Tensor, num_experts: int, capacity_factor: float, min_capacity: int) -> torch.Tensor:
    """DeepSpeed's rule read literally: C = max(ceil(T/E * CF), min_capacity); each expert keeps its first C tokens."""
    capacity = max(math.ceil(ids_T.numel() / num_experts * capacity_factor), min_capacity)
    seen = [0] * num_experts
    kept = []
    for expert in ids_T.tolist():
        kept.append(seen[expert] < capacity)
        seen[expert] += 1
    return torch.tensor(kept, dtype=torch.bool)


# ---------------------------------------------------------------------- rank side


def _weights(num_experts: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same stacked weights on every rank (same seed), scaled so outputs are O(1)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(num_experts, D, F, generator=gen, dtype=torch.float64) / D**0.5,
            torch.randn(num_experts, F, D, generator=gen, dtype=torch.float64) / F**0.5)


def _routing(kind: str, tokens: int, num_experts: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uniform / skew (the paper's): sampled; hot: every token to experts 0..k-1 (rank 0's);
    empty: tokens only on the experts of rank 0 (k = 1), every other rank's experts idle."""
    ids_TK, weight_TK = synthetic_routing("uniform" if kind in ("hot", "empty") else kind, tokens, num_experts, k,
                                          seed=seed, dtype=torch.float64)
    if kind == "hot":
        ids_TK = torch.arange(k).expand(tokens, k).clone()
    elif kind == "empty":
        ids_TK = ids_TK % (num_experts // dist.get_world_size())
    return ids_TK, weight_TK


def _batch(tokens: int, seed: int) -> torch.Tensor:
    return torch.randn(tokens, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _check(out_TD: torch.Tensor, ref_TD: torch.Tensor, what: str) -> None:
    err = (out_TD - ref_TD).abs().max().item() if out_TD.numel() else 0.0
    assert err <= 1e-12, f"rank {dist.get_rank()}: {what}: max error {err:.3g}"


def rank_dropless(num_experts: int, tokens: int, k: int, routing: str, seed: int, subgroup: bool = False) -> dict:
    """This rank's batch (its own size: tokens + rank) through dropless EP equals the reference."""
    rank = dist.get_rank()
    group = dist.new_group(list(range(dist.get_world_size()))) if subgroup else None
    w_in_EDF, w_out_EFD = _weights(num_experts, seed)
    T = tokens + rank
    x_TD = _batch(T, seed + rank)
    ids_TK, weight_TK = _routing(routing, T, num_experts, k, seed + rank)
    moe = DroplessExpertParallelMoE(w_in_EDF, w_out_EFD, group=group)
    out_TD = moe(x_TD, ids_TK, weight_TK)
    stats = moe.stats
    summary = load_summary(stats, group)  # every collective before any assertion: a failing rank strands the others
    _check(out_TD, reference_moe(x_TD, ids_TK, weight_TK, w_in_EDF, w_out_EFD), routing)
    assert stats.dropped == 0 and stats.kept_per_expert_E.tolist() == torch.bincount(
        ids_TK.reshape(-1), minlength=num_experts).tolist()
    tensors = {"kept_S": stats.kept_S.tolist(), "kept_per_expert_E": stats.kept_per_expert_E.tolist()}
    return dict(stats=vars(stats) | tensors, summary=summary)


def rank_capacity(num_experts: int, tokens: int, capacity_factor: float, min_capacity: int, routing: str,
                  seed: int, drop_policy: str = "position") -> dict:
    """Capacity EP: kept tokens equal the reference, dropped ones are zero, the count is reported.

    "position": exactly the tokens DeepSpeed's rule drops (deepspeed_kept). "random": which ones is
    random, but every expert keeps min(its tokens, C) of them.
    """
    rank = dist.get_rank()
    torch.manual_seed(seed + rank)  # "random" draws from the global RNG, as DeepSpeed's RTS does
    w_in_EDF, w_out_EFD = _weights(num_experts, seed)
    x_TD = _batch(tokens, seed + rank)
    ids_TK, weight_TK = _routing(routing, tokens, num_experts, 1, seed + rank)
    moe = CapacityExpertParallelMoE(w_in_EDF, w_out_EFD, capacity_factor=capacity_factor,
                                    min_capacity=min_capacity, drop_policy=drop_policy)
    out_TD = moe(x_TD, ids_TK, weight_TK)
    summary = load_summary(moe.stats)  # every collective before any assertion
    ref_TD = reference_moe(x_TD, ids_TK, weight_TK, w_in_EDF, w_out_EFD)
    ids_T, C, kept_T = ids_TK[:, 0], moe.stats.capacity, moe.stats.kept_S
    if drop_policy == "position":
        assert kept_T.tolist() == deepspeed_kept(ids_T, num_experts, capacity_factor, min_capacity).tolist()
    else:
        counts_E = torch.bincount(ids_T, minlength=num_experts)
        assert torch.bincount(ids_T[kept_T], minlength=num_experts).tolist() == counts_E.clamp(max=C).tolist()
    _check(out_TD[kept_T], ref_TD[kept_T], f"kept tokens ({routing})")
    assert (out_TD[~kept_T] == 0).all(), f"rank {rank}: a dropped token has a non-zero output"
    assert moe.stats.dropped == int((~kept_T).sum()), (moe.stats.dropped, kept_T.tolist())
    return dict(dropped=moe.stats.dropped, capacity=C, rows_computed=moe.stats.rows_computed, kept=kept_T.tolist(),
                offrank_bytes=moe.stats.offrank_bytes, summary=summary)


# ---------------------------------------------------------------------- routers (one process)


def chi_square(ids: torch.Tensor, probs_E: torch.Tensor) -> float:
    expected_E = probs_E * ids.numel()
    observed_E = torch.bincount(ids.reshape(-1), minlength=probs_E.numel()).double()
    return ((observed_E - expected_E) ** 2 / expected_E).sum().item()


# chi-square with 15 degrees of freedom (E = 16): mean 15, sd 5.5; 45 is a 1e-4 tail at a fixed seed
CHI2_BOUND_15_DOF = 45.0


@pytest.mark.parametrize("kind", ["skew", "zipf", "uniform"])
def test_synthetic_frequencies_match_probabilities(kind):
    """200k top-1 draws over 16 experts: the empirical histogram fits the stated probabilities."""
    probs_E = {"skew": skew_probs(16), "zipf": zipf_probs(16), "uniform": torch.full((16,), 1 / 16.0)}[kind]
    ids_TK, _ = synthetic_routing(kind, 200_000, 16, seed=0)
    assert chi_square(ids_TK, probs_E.double()) < CHI2_BOUND_15_DOF


def test_skew_and_zipf_probabilities():
    """The paper's k_r = 10% of E (at least 1) hot experts at 1/E + 0.6 before normalising; Zipf's 1/(i+1)^s."""
    for E, hot in [(4, 1), (8, 1), (16, 1), (64, 6), (128, 12)]:
        probs_E = skew_probs(E)
        expected_E = torch.tensor([1 / E + 0.6] * hot + [1 / E] * (E - hot), dtype=torch.float64)
        torch.testing.assert_close(probs_E, expected_E / expected_E.sum())
    zipf_E = torch.tensor([1, 1 / 4, 1 / 9, 1 / 16], dtype=torch.float64)
    torch.testing.assert_close(zipf_probs(4, s=2.0), zipf_E / zipf_E.sum())


def test_uniform_covers_every_expert():
    ids_TK, _ = synthetic_routing("uniform", 5000, 64, seed=3)
    assert torch.bincount(ids_TK[:, 0], minlength=64).min() > 0


@settings(max_examples=25)
@given(kind=st.sampled_from(["uniform", "skew", "zipf"]), num_experts=st.integers(1, 12),
       tokens=st.integers(0, 40), data=st.data())
def test_synthetic_routing_shapes(kind, num_experts, tokens, data):
    """Ids in range and distinct per token, weights in [0, 1] (summing to 1 for k > 1), and the seed decides."""
    k = data.draw(st.integers(1, min(4, num_experts)))
    ids_TK, weight_TK = synthetic_routing(kind, tokens, num_experts, k, seed=7)
    assert ids_TK.shape == weight_TK.shape == (tokens, k) and ids_TK.dtype == torch.int64
    assert ((0 <= ids_TK) & (ids_TK < num_experts)).all()
    assert all(len(set(row)) == k for row in ids_TK.tolist())
    assert ((0 <= weight_TK) & (weight_TK <= 1)).all()
    if k > 1 and tokens:
        torch.testing.assert_close(weight_TK.sum(1), torch.ones(tokens))
    again_TK, _ = synthetic_routing(kind, tokens, num_experts, k, seed=7)
    assert torch.equal(ids_TK, again_TK)


def test_model_routing_is_switch_top1():
    logits_TE = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    ids_TK, weight_TK = model_routing(logits_TE)
    assert torch.equal(ids_TK[:, 0], logits_TE.argmax(1))
    torch.testing.assert_close(weight_TK[:, 0], torch.softmax(logits_TE, 1).max(1).values)


# ---------------------------------------------------------------------- expert parallelism, one process


def test_deepspeed_capacity_rule():
    """ceil(T/E * CF), floored at min_capacity: T is the local batch's token count."""
    assert deepspeed_capacity(120, 8, 1.0, 4) == 15
    assert deepspeed_capacity(120, 8, 1.1, 4) == 17  # 16.5 rounds up
    assert deepspeed_capacity(10, 8, 1.0, 4) == 4  # ceil(1.25) = 2 < min_capacity
    assert deepspeed_capacity(30_000, 128, 50.0, 4) == 11_719  # the paper's CF = min(E, 50) at E = 128


@pytest.mark.parametrize("routing", ["uniform", "hot"])
def test_world_size_1_without_distributed(routing):
    """No process group at all: both layers run every expert locally and equal the reference."""
    E, T = 4, 12
    w_in_EDF, w_out_EFD = _weights(E, seed=1)
    x_TD = _batch(T, seed=2)
    ids_TK, weight_TK = synthetic_routing("uniform", T, E, seed=3, dtype=torch.float64)
    if routing == "hot":
        ids_TK = torch.zeros_like(ids_TK)
    ref_TD = reference_moe(x_TD, ids_TK, weight_TK, w_in_EDF, w_out_EFD)
    dropless = DroplessExpertParallelMoE(w_in_EDF, w_out_EFD)
    capacity = CapacityExpertParallelMoE(w_in_EDF, w_out_EFD, capacity_factor=float(E))
    torch.testing.assert_close(dropless(x_TD, ids_TK, weight_TK), ref_TD, rtol=0, atol=1e-12)
    torch.testing.assert_close(capacity(x_TD, ids_TK, weight_TK), ref_TD, rtol=0, atol=1e-12)
    assert dropless.stats.offrank_bytes == capacity.stats.offrank_bytes == 0 and capacity.stats.dropped == 0


def test_rejects_what_deepspeed_rejects():
    w_in_EDF, w_out_EFD = _weights(4, seed=0)
    moe = CapacityExpertParallelMoE(w_in_EDF, w_out_EFD, min_capacity=4)
    x_TD, ids_TK, weight_TK = _batch(3, 0), torch.zeros(3, 1, dtype=torch.int64), torch.ones(3, 1)
    with pytest.raises(ValueError, match="min_capacity"):
        moe(x_TD, ids_TK, weight_TK)
    with pytest.raises(ValueError, match="top-1"):
        moe(_batch(8, 0), torch.zeros(8, 2, dtype=torch.int64), torch.ones(8, 2))


# ---------------------------------------------------------------------- expert parallelism, 2 gloo ranks


@st.composite
def dropless_cases(draw, experts=(2, 4, 6)) -> dict:
    num_experts = draw(st.sampled_from(experts))
    routing = draw(st.sampled_from(ROUTINGS))
    k = 1 if routing == "empty" else draw(st.integers(1, min(2, num_experts)))
    return dict(num_experts=num_experts, tokens=draw(st.integers(0, 9)), routing=routing, k=k,
                seed=draw(st.integers(0, 999)))


@settings(max_examples=40)  # about 10 ms each
@given(case=dropless_cases())
def test_dropless_equals_reference(world_2, case):
    """Any routing, top-1 or top-2, ranks with different batch sizes (rank 0 possibly empty)."""
    for result in world_2.run(rank_dropless, **case):
        assert result["summary"]["dropped"] == 0


@pytest.mark.parametrize("routing", ROUTINGS)
def test_dropless_routings(world_2, routing):
    """Each routing once, deterministically: hot sends everything to rank 0's expert 0; empty
    leaves rank 1 with no rows; the load summary sees it."""
    results = world_2.run(rank_dropless, num_experts=4, tokens=8, k=1, routing=routing, seed=0)
    total = 8 + 9
    summary = results[0]["summary"]
    assert summary == results[1]["summary"]
    assert summary["mean_useful_rows"] == summary["mean_rows_computed"] == total / 2
    if routing in ("hot", "empty"):
        assert summary["max_useful_rows"] == total  # rank 0 computes every row
        row_bytes = D * 8
        # rank 1 sends its 9 rows out, rank 0 sends their results back: 9 rows each, plus 2 counts each
        assert [r["stats"]["offrank_bytes"] for r in results] == [9 * row_bytes + 2 * 8] * 2


def test_dropless_on_a_new_group(world_2):
    """Any process group, not only the default one."""
    world_2.run(rank_dropless, num_experts=4, tokens=5, k=2, routing="skew", seed=1, subgroup=True)


@pytest.mark.parametrize("routing", ROUTINGS)
def test_capacity_large_factor_drops_nothing(world_2, routing):
    """CF = E makes C = T: every token fits, the layer equals the reference exactly."""
    for result in world_2.run(rank_capacity, num_experts=4, tokens=10, capacity_factor=4.0, min_capacity=4,
                              routing=routing, seed=0):
        assert result["dropped"] == 0 and result["capacity"] == 10
        # two all-to-alls of the [E, C, D] buffer, the half for the other rank each way
        assert result["offrank_bytes"] == 2 * 2 * 10 * D * 8
        assert result["summary"]["max_rows_computed"] == result["rows_computed"] == 2 * 2 * 10


@pytest.mark.parametrize(("routing", "drop_policy"), [("hot", "position"), ("skew", "position"),
                                                      ("uniform", "position"), ("hot", "random")])
def test_capacity_small_factor_drops_as_deepspeed(world_2, routing, drop_policy):
    """CF = 0.5 over 16 tokens and 4 experts: C = 2; the hot routing keeps 2 of 16 tokens per rank."""
    results = world_2.run(rank_capacity, num_experts=4, tokens=16, capacity_factor=0.5, min_capacity=0,
                          routing=routing, seed=0, drop_policy=drop_policy)
    assert all(r["capacity"] == 2 for r in results)
    if routing == "hot":
        assert [r["dropped"] for r in results] == [14, 14] and results[0]["summary"]["dropped"] == 28
        first_two = [True] * 2 + [False] * 14
        kept = [r["kept"] for r in results]
        assert all((kept_T == first_two) == (drop_policy == "position") for kept_T in kept), kept
    assert all(r["dropped"] > 0 for r in results)


@st.composite
def capacity_cases(draw, experts=(2, 4)) -> dict:
    return dict(num_experts=draw(st.sampled_from(experts)), tokens=draw(st.integers(4, 14)),
                routing=draw(st.sampled_from(ROUTINGS)),
                capacity_factor=draw(st.sampled_from([0.25, 0.5, 1.0, 1.5, 2.0])),
                min_capacity=draw(st.integers(0, 4)), seed=draw(st.integers(0, 999)))


@settings(max_examples=40)
@given(case=capacity_cases())
def test_capacity_equals_deepspeed_rule(world_2, case):
    """Any capacity factor and min_capacity: exactly DeepSpeed's drops, the rest equal the reference."""
    world_2.run(rank_capacity, **case)


# ---------------------------------------------------------------------- 4 gloo ranks


@settings(max_examples=20)
@given(case=dropless_cases(experts=(4, 8)))
def test_dropless_equals_reference_world_4(world_4, case):
    world_4.run(rank_dropless, **case)


@settings(max_examples=20)
@given(case=capacity_cases(experts=(4, 8)))
def test_capacity_equals_deepspeed_rule_world_4(world_4, case):
    world_4.run(rank_capacity, **case)


@pytest.mark.parametrize("moe, sparse_layers", [(True, 3), (False, 0)])
def test_encoder_bench_builds_the_dense_reference_without_a_sparse_layer(moe, sparse_layers):
    """transformers' num_sparse_encoder_layers=0 still makes layer 1 sparse; the dense reference
    of bench/encoder.py must have none, or its MoE layer graph-breaks under Inductor."""
    from bench.encoder import SMOKE, build_encoder

    args = type("Args", (), {**SMOKE, "layers": 6, "seed": 0})()
    model = build_encoder(args, moe=moe)
    kinds = [type(block.layer[-1].mlp).__name__ for block in model.encoder.block]
    assert kinds.count("SwitchTransformersSparseMLP") == sparse_layers and len(kinds) == 6
