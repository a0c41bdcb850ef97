"""Pure FX graph -> graph passes: recognise MoE regions, rewrite them into grouped computations.

    regions = recognise(gm)      # records; the graph is left as it is
    prepare(gm, regions)         # each region's routing nodes
    verify(gm, regions, inputs)  # every record checked against the graph, numerically
    sources = rewrite(gm, regions, dropless, plan)   # the grouped computations; their weight inputs
"""

from .pipeline import prepare, recognise, rewrite
from .region import ExpertWeights, MoERegion, Routing, Status, WeightSource
from .verify import verify

__all__ = ["recognise", "prepare", "verify", "rewrite", "MoERegion", "ExpertWeights", "Routing", "Status",
           "WeightSource"]
