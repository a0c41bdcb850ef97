"""bench/paper.py's model of N ranks, off the device: the link constants are the fit of the
measured 4-H100 rows, the hybrid placements' traffic meets its two ends (g = 1 is dropless expert
parallelism, g = N moeshard's exchange), and the systems follow N."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench`
from bench.calibrate_links import SIMULATED, fit, load_samples, residuals  # noqa: E402
from bench.common.links import ALL_TO_ALL, GATHER, H100_NVLINK, Transfer  # noqa: E402
from bench.paper import MEASURED, expert_groups, link_model, parse_args, placement_traffic, systems_for  # noqa: E402


def test_link_constants_are_the_fit_of_the_measured_rows():
    fitted = fit(load_samples(list(MEASURED), SIMULATED))
    for field in ("gather_gbs", "all_to_all_gbs", "latency_ms", "host_sync_ms"):
        assert getattr(H100_NVLINK, field) == pytest.approx(getattr(fitted, field), rel=5e-3), field


def test_the_calibrated_simulation_is_within_its_documented_residuals():
    """docs/results.md quotes these bounds (simulated / measured latency, per measured row)."""
    ratios = [row["sim_over_measured"] for row in residuals(load_samples(list(MEASURED), SIMULATED), H100_NVLINK)]
    assert len(ratios) == 34 and 0.85 < min(ratios) and max(ratios) < 1.2


def test_transfer_cost_by_kind():
    link = H100_NVLINK
    assert link.transfer_ms(Transfer("x", GATHER, 0)) == link.latency_ms
    assert link.transfer_ms(Transfer("x", GATHER, int(link.gather_gbs * 1e6))) == pytest.approx(link.latency_ms + 1)
    assert link.transfer_ms(Transfer("x", ALL_TO_ALL, int(link.all_to_all_gbs * 1e6))) == pytest.approx(
        link.latency_ms + 1)


def test_options_override_the_fitted_link():
    args = parse_args(["--smoke", "--bandwidth-gbs", "100", "--collective-latency-ms", "0"])
    link = link_model(args)
    assert (link.gather_gbs, link.all_to_all_gbs, link.latency_ms) == (100, 100, 0)
    assert link.host_sync_ms == H100_NVLINK.host_sync_ms
    assert link_model(parse_args(["--smoke"])) == H100_NVLINK


def test_hybrid_systems_follow_the_divisors_of_N():
    hybrids = {N: [s for s in systems_for(N) if s.startswith("moeshard_g")] for N in (2, 3, 4, 6, 8)}
    assert hybrids == {2: [], 3: [], 4: ["moeshard_g2"], 6: ["moeshard_g2", "moeshard_g3"],
                       8: ["moeshard_g2", "moeshard_g4"]}


def test_expert_groups_are_contiguous_and_as_even_as_possible():
    assert [list(r) for r in expert_groups(10, 4)] == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert [len(r) for r in expert_groups(64, 2)] == [32, 32]


def test_placement_traffic_at_g_1_is_dropless_expert_parallelism():
    """Rank n sends its rows of rank q's experts to rank q, q != n, and receives what others route to it."""
    rows_NQ = torch.tensor([[5, 1, 0, 2], [3, 4, 1, 0], [7, 0, 2, 1], [0, 2, 6, 3]])
    sent_N, received_N = placement_traffic(rows_NQ, 1)
    off_rank_NQ = rows_NQ * (1 - torch.eye(4, dtype=rows_NQ.dtype))
    assert sent_N.tolist() == off_rank_NQ.sum(1).tolist()
    assert received_N.tolist() == off_rank_NQ.sum(0).tolist()


def test_placement_traffic_at_g_N_is_moeshards_exchange():
    """One group of every rank: each rank's S rows go to the N - 1 others, and it receives theirs."""
    N, S = 4, 30
    sent_N, received_N = placement_traffic(torch.full((N, 1), S), N)
    assert sent_N.tolist() == [(N - 1) * S] * N and received_N.tolist() == [(N - 1) * S] * N


def test_placement_traffic_of_groups_of_two():
    """N = 4, g = 2: rank 0 sends its group-0 rows to rank 1 only and its group-1 rows to ranks 2 and 3."""
    rows_NQ = torch.tensor([[10, 2], [8, 4], [6, 6], [9, 1]])
    sent_N, received_N = placement_traffic(rows_NQ, 2)
    assert sent_N.tolist() == [10 + 2 * 2, 8 + 2 * 4, 6 * 2 + 6, 9 * 2 + 1]
    assert received_N.tolist() == [8 + 6 + 9, 10 + 6 + 9, 2 + 4 + 1, 2 + 4 + 6]
