"""Which ranks share each expert: the expert group size g of every MoE layer (passes/shard.py).

MoEShard (g = N) balances any routing perfectly, but every rank receives every rank's rows.
Expert groups (g < N) send each row only to the g ranks of its experts' group, so they move
fewer bytes, but the group holding the hot experts computes more, and their exchange reads its
split sizes on the host. Per layer and per g dividing N (S rows a rank, rows_q all ranks' rows
for group q's experts, M = 2 or 3 matmuls of D x F per expert):

    compute_ms = max_q rows_q * 2*M*D*F / g / rate + (E / (N/g)) * M*D*F / g * bytes / memory
    sent rows  = g*S - own           (MoEShard: (N-1)*S)
    received   = max_q rows_q - own  (MoEShard: (N-1)*S)     own = max_q rows_q / N, needing no link
    comm_ms    = 2 * max(sent, received) * D * bytes / link + 3 * latency  (+ 2 host syncs if g < N)

with the rows_q of the first call's routing on every rank (summed over the ranks), and the
link's bandwidth, latency and the matmul rate measured once per process, on rank 0, and given
to every rank so that all choose alike. The model is serial (no overlap), as bench/paper.py's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from moeshard_compile.passes.evaluate import Evaluator
from moeshard_compile.passes.region import MoERegion, Status
from moeshard_compile.passes.shard import ShardPlan, ffn_block

# What a host sync in the middle of a layer costs: the device runs dry, then waits for the host to
# launch the rest. CUDA: fitted to the dropless expert-parallel rows measured on 4 H100s
# (bench/common/links.py, docs/results.md); CPU ranks run their ops synchronously anyway.
HOST_SYNC_MS = {"cuda": 1.29, "cpu": 0.0}
MEMORY_GBS = {"cuda": 3000.0, "cpu": 20.0}  # weight reads; conservative (H100 copy ~3.0 TB/s)
_PROBE_ROWS = 1 << 16  # bytes probe: 64 Ki elements a rank
_MEASURED: dict[tuple, "Machine"] = {}


@dataclass(frozen=True)
class Machine:
    """What the model needs of the hardware: link bandwidth and latency, matmul rate."""

    link_gbs: float
    latency_ms: float
    tflops: float
    sync_ms: float
    memory_gbs: float


@dataclass(frozen=True)
class LayerShape:
    """One MoE layer as the model sees it: N ranks, S rows a rank, and the expert shapes."""

    N: int
    S: int
    E: int
    D: int
    F: int
    matmuls: int
    element_bytes: int


@dataclass(frozen=True)
class PlacementChoice:
    """The group size a region runs with, how it was chosen, and the modelled ms of every g."""

    group_size: int
    how: str
    modelled_ms: dict[int, float] = field(default_factory=dict)

    def text(self, world_size: int) -> str:
        name = "MoEShard" if self.group_size == world_size else f"groups of {self.group_size}"
        if not self.modelled_ms:
            return f"{name} ({self.how})"
        times = ", ".join(f"g={g} {ms:.3g} ms" for g, ms in sorted(self.modelled_ms.items()))
        return f"{name} ({self.how}: {times})"

    def to_dict(self) -> dict:
        return {"group_size": self.group_size, "how": self.how,
                "modelled_ms": {str(g): ms for g, ms in self.modelled_ms.items()}}


def modelled_ms(g: int, layer: LayerShape, rows_E: list[float], machine: Machine) -> float:
    """The layer's modelled time with expert groups of g ranks (the module docstring's formulas)."""
    N, S, Q = layer.N, layer.S, layer.N // g
    total = sum(rows_E) or 1.0
    share_Q = [sum(rows_E[slice(*ffn_block(layer.E, q, Q))]) / total for q in range(Q)]  # of all N*S rows
    busiest = max(share_Q) * N * S
    flops = busiest * 2 * layer.matmuls * layer.D * layer.F / g
    held_bytes = -(-layer.E // Q) * layer.matmuls * layer.D * layer.F / g * layer.element_bytes
    compute = flops / (machine.tflops * 1e9) + held_bytes / (machine.memory_gbs * 1e6)
    own = busiest / N  # this rank's rows for its own group, at the busiest group
    sent, received = (N - 1) * S, (N - 1) * S
    if g < N:
        sent, received = g * S - own, busiest - own
    comm = 2 * max(sent, received) * layer.D * layer.element_bytes / (machine.link_gbs * 1e6) + 3 * machine.latency_ms
    return compute + comm + (2 * machine.sync_ms if g < N else 0.0)


def best_group_size(layer: LayerShape, rows_E: list[float], machine: Machine,
                    candidates: list[int]) -> tuple[int, dict[int, float]]:
    """The candidate g of least modelled time (ties: the larger g, which balances better)."""
    times = {g: modelled_ms(g, layer, rows_E, machine) for g in candidates}
    return min(times, key=lambda g: (times[g], -g)), times


def choose_placements(regions: list[MoERegion], values: dict, plan: ShardPlan | None, option,
                      group: "dist.ProcessGroup | None", cuda_graphs: bool = False) -> dict[MoERegion, PlacementChoice]:
    """Every recognised region's group size: MoEShard, the forced g, or the model's choice
    (MoEShard alone under CUDA graphs, which expert groups' host syncs would break)."""
    todo = [r for r in regions if r.status is Status.RECOGNISED]
    if plan is None or not todo:
        return {}
    if option != "auto":
        how = "forced" if option is not None else "default"
        return {r: PlacementChoice(plan.g, how) for r in todo}
    candidates = [g for g in range(1, plan.world_size + 1) if plan.world_size % g == 0
                  and all(r.num_experts >= plan.world_size // g and r.d_ff >= g for r in todo)]
    if plan.input_mode != "data_parallel" or plan.overlap != "none" or plan.comm_chunks > 1 or cuda_graphs:
        candidates = [plan.world_size]  # MoEShard's own schedules, or CUDA graphs
    rows_RE = _global_rows_per_expert(todo, values, group)
    machine = measured_machine(group, _device(values), todo[0].dtype)
    choices = {}
    for region, rows_E in zip(todo, rows_RE):
        layer = _layer(region, plan.world_size)
        g, times = best_group_size(layer, rows_E, machine, candidates)
        choices[region] = PlacementChoice(g, "cost model", times)
    return choices


def _layer(region: MoERegion, N: int) -> LayerShape:
    tokens = region.tokens_TD.meta["example_value"]
    return LayerShape(N=N, S=int(tokens.shape[0]) * region.top_k, E=region.num_experts, D=region.d_model,
                      F=region.d_ff, matmuls=3 if region.gated else 2, element_bytes=tokens.element_size())


def _global_rows_per_expert(regions: list[MoERegion], values: dict, group) -> list[list[float]]:
    """Rows routed to each expert by this call's batch on every rank (one all-reduce)."""
    graph = regions[0].output_TD.graph
    evaluator = Evaluator(graph, values)
    local = []
    for region in regions:
        routing = region.routing
        if routing.ids_TK is not None:
            (ids_TK,) = evaluator.run([routing.ids_TK])
            local.append(torch.bincount(ids_TK.reshape(-1).long().cpu(), minlength=region.num_experts).double())
        else:
            (combine_TE,) = evaluator.run([routing.combine_TE])
            local.append((combine_TE != 0).sum(0).double().cpu())
    rows_RE = torch.nn.utils.rnn.pad_sequence(local, batch_first=True)
    summed = rows_RE.to(_group_device(group))
    dist.all_reduce(summed, group=group)
    return [row[:region.num_experts].tolist() for row, region in zip(summed.cpu(), regions)]


def measured_machine(group, device: torch.device, dtype: torch.dtype) -> Machine:
    """Rank 0's measurements of the link and the matmul rate in `dtype`, the same on every
    rank; once per process, group, device type and dtype."""
    key = (group.group_name, device.type, dtype)
    if key not in _MEASURED:
        mine = torch.tensor(_measure(group, device, dtype), dtype=torch.float64, device=_group_device(group))
        dist.broadcast(mine, src=dist.get_global_rank(group, 0), group=group)
        link_gbs, latency_ms, tflops = mine.tolist()
        _MEASURED[key] = Machine(link_gbs, latency_ms, tflops, HOST_SYNC_MS.get(device.type, 0.0),
                                 MEMORY_GBS.get(device.type, 20.0))
    return _MEASURED[key]


def _measure(group, device: torch.device, dtype: torch.dtype) -> list[float]:
    """[link GB/s per rank, collective latency ms, matmul TFLOP/s] on this rank."""
    world = dist.get_world_size(group)
    on = _group_device(group)
    small, big = torch.zeros(8, device=on), torch.randn(_PROBE_ROWS, 64, device=on)
    small_ms = _timed_ms(lambda: dist.all_reduce(small, group=group), on)
    big_ms = _timed_ms(lambda: dist.all_gather_into_tensor(big.new_empty(world * big.shape[0], 64), big, group=group), on)
    link_gbs = (world - 1) * big.numel() * big.element_size() / max(big_ms - small_ms, 1e-3) / 1e6
    a, b = (torch.randn(1024, 1024, device=device).to(dtype) for _ in range(2))
    tflops = 2 * 1024**3 / _timed_ms(lambda: a @ b, device) / 1e9
    return [link_gbs, small_ms, tflops]


def _timed_ms(fn, device: torch.device, repeats: int = 3) -> float:
    fn()
    _sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - started) * 1e3 / repeats


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _group_device(group) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")


def _device(values: dict) -> torch.device:
    tensors = [v for v in values.values() if isinstance(v, torch.Tensor)]
    return tensors[0].device if tensors else torch.device("cpu")
