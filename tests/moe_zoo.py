"""Hand-written MoE layers in the spellings users write, for the property tests.

Every spelling computes out[t] = sum over routed experts e of weight[t, e] * ffn_e(x[t]),
with the routing computed by the layer itself (several routers, optional Switch capacity).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh GELU spelled out, as HF's NewGELUActivation does."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": gelu_new,
    "silu": F.silu,
}


@dataclass(frozen=True)
class MoEConfig:
    num_experts: int = 4
    top_k: int = 2
    d_model: int = 8
    d_ff: int = 16
    activation: str = "relu"
    gated: bool = False
    bias: bool = False
    style: str = "index"  # "index" (where + index_add), "mask" (boolean indexing), "dense"
    container: str = "list"  # "list" (nn.ModuleList), "dict" (nn.ModuleDict), "stacked" (3-D parameters, w[e])
    router: str = "softmax_topk"  # "softmax_topk", "softmax_topk_renorm", "topk_softmax", "switch"
    capacity: int = 0  # Switch router only: tokens past it are dropped
    skew: str = "none"  # "none", "hot" (every token to expert 0), "empty" (only the first k experts used)


class ExpertFFN(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.activation]
        self.w_in = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.w_gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias) if cfg.gated else None
        self.w_out = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)

    def forward(self, x):
        h = self.act(self.w_gate(x)) * self.w_in(x) if self.w_gate is not None else self.act(self.w_in(x))
        return self.w_out(h)


class StackedExperts(nn.Module):
    """All experts' weights in 3-D parameters; the loop reads expert e's slices w[e]."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        if cfg.bias:
            raise ValueError("StackedExperts has no biases: draw bias=False with container='stacked'")
        E, D, F = cfg.num_experts, cfg.d_model, cfg.d_ff
        self.act = ACTIVATIONS[cfg.activation]
        self.w_in_EDF = nn.Parameter(torch.randn(E, D, F) / D**0.5)
        self.w_gate_EDF = nn.Parameter(torch.randn(E, D, F) / D**0.5) if cfg.gated else None
        self.w_out_EFD = nn.Parameter(torch.randn(E, F, D) / F**0.5)

    def expert(self, e: int, x_TD: torch.Tensor) -> torch.Tensor:
        h_TF = x_TD @ self.w_in_EDF[e]
        h_TF = self.act(x_TD @ self.w_gate_EDF[e]) * h_TF if self.w_gate_EDF is not None else self.act(h_TF)
        return h_TF @ self.w_out_EFD[e]


class HandWrittenMoE(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.router = nn.Linear(cfg.d_model, cfg.num_experts, bias=False)
        skew = torch.zeros(cfg.num_experts)
        if cfg.skew == "hot":
            skew[0] = 30.0
        elif cfg.skew == "empty":
            skew[cfg.top_k :] = -30.0
        self.register_buffer("skew", skew)
        if cfg.container == "stacked":
            self.experts = StackedExperts(cfg)
            return
        experts = [ExpertFFN(cfg) for _ in range(cfg.num_experts)]
        if cfg.container == "dict":
            self.experts = nn.ModuleDict({f"expert_{e}": ex for e, ex in enumerate(experts)})
        else:
            self.experts = nn.ModuleList(experts)

    def expert_list(self):
        if isinstance(self.experts, StackedExperts):
            return [functools.partial(self.experts.expert, e) for e in range(self.cfg.num_experts)]
        return list(self.experts.values()) if isinstance(self.experts, nn.ModuleDict) else list(self.experts)

    def route(self, x_TD):
        """(ids [T, K], weights [T, K], keep [T, K] bool: False where capacity dropped the slot)."""
        cfg = self.cfg
        logits_TE = self.router(x_TD) + self.skew
        if cfg.router == "switch":
            probs_TE = logits_TE.softmax(-1)
            weights_T1, ids_T1 = probs_TE.max(-1, keepdim=True)
            priority_TE = torch.cumsum(F.one_hot(ids_T1[:, 0], cfg.num_experts), dim=0)
            keep_T1 = (priority_TE <= cfg.capacity).gather(1, ids_T1)
            return ids_T1, weights_T1, keep_T1
        if cfg.router == "topk_softmax":
            top_logits_TK, ids_TK = logits_TE.topk(cfg.top_k, dim=-1)
            weights_TK = top_logits_TK.softmax(-1)
        else:
            weights_TK, ids_TK = logits_TE.softmax(-1).topk(cfg.top_k, dim=-1)
            if cfg.router == "softmax_topk_renorm":
                weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
        return ids_TK, weights_TK, torch.ones_like(ids_TK, dtype=torch.bool)

    def forward(self, x_BSD):
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        ids_TK, weights_TK, keep_TK = self.route(x_TD)
        out_TD = torch.zeros_like(x_TD)
        for e, expert in enumerate(self.expert_list()):
            mask_TK = (ids_TK == e) & keep_TK
            if self.cfg.style == "index":
                token, slot = torch.where(mask_TK)
                out_TD.index_add_(0, token, expert(x_TD[token]) * weights_TK[token, slot, None])
            elif self.cfg.style == "mask":
                routed_T = mask_TK.any(-1)
                out_TD[routed_T] += expert(x_TD[routed_T]) * (weights_TK * mask_TK).sum(-1)[routed_T].unsqueeze(-1)
            else:
                out_TD = out_TD + expert(x_TD) * (weights_TK * mask_TK).sum(-1, keepdim=True)
        return out_TD.reshape(x_BSD.shape)


class MoEBlock(nn.Module):
    """A pre-norm residual block around the MoE, so the region sits inside other ops."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model)
        self.moe = HandWrittenMoE(cfg)

    def forward(self, x):
        return x + self.moe(self.norm(x))


@st.composite
def moe_configs(draw, d_ff: st.SearchStrategy[int] = st.sampled_from([4, 8, 20])) -> MoEConfig:
    """Any hand-written MoE: every router, dispatch spelling, container, activation and skew."""
    router = draw(st.sampled_from(["softmax_topk", "softmax_topk_renorm", "topk_softmax", "switch"]))
    num_experts = draw(st.integers(1, 16))
    container = draw(st.sampled_from(["list", "dict", "stacked"]))  # stacked: 3-D parameters read as w[e]
    top_k = 1 if router == "switch" else draw(st.integers(1, min(4, num_experts)))
    return MoEConfig(
        num_experts=num_experts,
        top_k=top_k,
        d_model=draw(st.sampled_from([4, 8, 12])),
        d_ff=draw(d_ff),
        activation=draw(st.sampled_from(sorted(ACTIVATIONS))),
        gated=draw(st.booleans()),
        bias=draw(st.booleans()) if container != "stacked" else False,
        style=draw(st.sampled_from(["index", "mask", "dense"])),
        container=container,
        router=router,
        capacity=draw(st.integers(1, 6)),
        skew=draw(st.sampled_from(["none", "hot", "empty"])),
    )
