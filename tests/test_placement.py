"""The placement cost model's choices on a table of cases (moeshard_compile/placement.py).

A fixed machine (an NVLink H100-like link as measured by NCCL, its bf16 matmul rate), the
paper's layer (Switch-Base: D 768, F 3072, top-1, 30000 tokens a rank, N = 4), and routings
whose effect is known: uniform routing makes every group equally busy, so expert parallelism's
fewer bytes win; the paper's skew puts most rows on the group of the hot experts, so MoEShard's
balance wins; a tiny batch is bound by the collectives' latency and the host syncs.
"""

import pytest

from moeshard_compile.placement import LayerShape, Machine, PlacementChoice, best_group_size, modelled_ms

H100_NVLINK = Machine(link_gbs=140.0, latency_ms=0.02, tflops=700.0, sync_ms=0.05, memory_gbs=3000.0)
SLOW_LINK = Machine(link_gbs=10.0, latency_ms=0.02, tflops=700.0, sync_ms=0.05, memory_gbs=3000.0)


def switch_layer(tokens: int, experts: int = 64) -> LayerShape:
    return LayerShape(N=4, S=tokens, E=experts, D=768, F=3072, matmuls=2, element_bytes=2)


def uniform(E: int) -> list[float]:
    return [1.0] * E


def paper_skew(E: int) -> list[float]:
    """p_e proportional to 1/E + 0.6 on the first 10% of the experts (the MoEShard paper's router)."""
    hot = max(1, E // 10)
    return [1 / E + (0.6 if e < hot else 0.0) for e in range(E)]


def one_hot(E: int) -> list[float]:
    return [1.0] + [0.0] * (E - 1)


CASES = [  # (what, layer, routing, machine, chosen g)
    ("uniform, fast link: fewest bytes", switch_layer(30000), uniform(64), H100_NVLINK, 1),
    ("paper skew: balance", switch_layer(30000), paper_skew(64), H100_NVLINK, 4),
    ("one hot expert: balance", switch_layer(30000), one_hot(64), H100_NVLINK, 4),
    ("uniform, slow link: fewest bytes", switch_layer(30000), uniform(64), SLOW_LINK, 1),
    ("paper skew, slow link: bytes outweigh the hot group", switch_layer(30000), paper_skew(64), SLOW_LINK, 1),
    ("10 tokens, uniform: no host syncs", switch_layer(10), uniform(64), H100_NVLINK, 4),
]


@pytest.mark.parametrize(("what", "layer", "rows_E", "machine", "chosen"), CASES, ids=[c[0] for c in CASES])
def test_cost_model_chooses(what, layer, rows_E, machine, chosen):
    g, times = best_group_size(layer, rows_E, machine, [1, 2, 4])
    assert g == chosen, f"{what}: modelled {times}"
    assert set(times) == {1, 2, 4} and all(ms > 0 for ms in times.values())


def test_moeshard_time_does_not_depend_on_the_routing():
    layer = switch_layer(30000)
    times = {modelled_ms(4, layer, rows_E, H100_NVLINK) for rows_E in (uniform(64), paper_skew(64), one_hot(64))}
    assert max(times) - min(times) < 1e-9


def test_hotter_routing_slows_expert_groups():
    layer = switch_layer(30000)
    assert (modelled_ms(1, layer, uniform(64), H100_NVLINK) < modelled_ms(1, layer, paper_skew(64), H100_NVLINK)
            < modelled_ms(1, layer, one_hot(64), H100_NVLINK))


def test_uneven_expert_blocks_count_the_larger_group():
    """E 6 over 4 groups: groups hold 2, 2, 1, 1 experts; all rows on expert 1 (group 0) weigh
    like a hot group whatever the block sizes."""
    layer = LayerShape(N=4, S=30000, E=6, D=768, F=3072, matmuls=2, element_bytes=2)
    hot_in_first = [0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    hot_in_last = [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert modelled_ms(1, layer, hot_in_first, H100_NVLINK) == pytest.approx(modelled_ms(1, layer, hot_in_last, H100_NVLINK),
                                                                             rel=0.05)


def test_choice_text_names_every_modelled_g():
    choice = PlacementChoice(4, "cost model", {1: 3.2, 2: 2.9, 4: 2.4})
    assert choice.text(4) == "MoEShard (cost model: g=1 3.2 ms, g=2 2.9 ms, g=4 2.4 ms)"
    assert PlacementChoice(1, "forced").text(4) == "groups of 1 (forced)"
    assert choice.to_dict()["modelled_ms"] == {"1": 3.2, "2": 2.9, "4": 2.4}
