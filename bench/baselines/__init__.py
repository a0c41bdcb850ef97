"""Baselines MoEShard is compared against: expert-parallel MoE layers and benchmark routings.

Plain PyTorch modules over any process group (gloo on CPU, NCCL on GPUs), built from the same
stacked expert weights as a single-device MoE so results can be checked against it. Beside them:
expert_computations.py (one layer's expert computation written the ways the benchmarks compare it)
and grouped_mm.py (the library grouped matmul they use), imported by their module names.
"""

from .expert_parallel import (
    CapacityExpertParallelMoE,
    DroplessExpertParallelMoE,
    LayerStats,
    deepspeed_capacity,
    load_summary,
)
from .routers import model_routing, sample_routing, skew_probs, synthetic_routing, uniform_probs, zipf_probs

__all__ = [
    "CapacityExpertParallelMoE", "DroplessExpertParallelMoE", "LayerStats", "deepspeed_capacity", "load_summary",
    "model_routing", "sample_routing", "skew_probs", "synthetic_routing", "uniform_probs", "zipf_probs",
]
