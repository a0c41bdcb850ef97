"""Pure FX graph -> graph passes: recognise MoE regions, rewrite them into grouped computations."""

from passes.pipeline import recognise, rewrite
from passes.region import ExpertWeights, MoERegion, Routing, WeightSource

__all__ = ["recognise", "rewrite", "MoERegion", "ExpertWeights", "Routing", "WeightSource"]
