"""Pure FX graph -> graph passes: recognise MoE regions, rewrite them into grouped computations."""

from .pipeline import recognise, rewrite
from .region import ExpertWeights, MoERegion, Routing, WeightSource
from .verify import verify

__all__ = ["recognise", "verify", "rewrite", "MoERegion", "ExpertWeights", "Routing", "WeightSource"]
