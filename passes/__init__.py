"""Pure FX graph -> graph passes: recognise MoE regions, rewrite them into grouped computations."""

from passes.pipeline import recognise, rewrite
from passes.region import ExpertWeights, MoERegion, Routing, WeightSource
from passes.verify import verify

__all__ = ["recognise", "verify", "rewrite", "MoERegion", "ExpertWeights", "Routing", "WeightSource"]
