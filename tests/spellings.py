"""A corpus of hand-written MoE layers: the ordinary ways a PyTorch user spells one.

Every class computes, for tokens x_TD,

    y_t = sum over routed e of c[t, e] * f_e(x_t)  (+ shared experts)

where f_e reads only expert e's weights. Each takes (d_model, d_ff, num_experts, top_k) in
its constructor (the top-1 spellings ignore top_k), and `forward(x)` takes x of shape
[B, S, D] (any leading dims work: they are flattened to T tokens, so [T, D] works too) and
returns the same shape.

For checking, every class also exposes, on flattened tokens x_TD:
  route(x_TD)          -> (ids_TK, w_TK): the router (w is 0 where a capacity limit dropped the slot)
  gate(x_TD)           -> g_TE: the router's dense weights (0 where not routed, after any drop)
  coefficients(x_TD)   -> c_TE: what multiplies expert e's output (= gate, except where the
                          weight is applied to the expert's input: then 1 where routed)
  expert_outputs(x_TD) -> y_ETD: every expert run on every token, the plain way (for the
                          input-scaling spellings, on the scaled input gate[:, e] * x)
  shared(x_TD)         -> y_TD or None: the always-on part (shared experts)
so that forward(x) == reference(module, x) == sum_e c[:, e, None] * y_ETD[e] + shared.

`set_skew("hot" | "empty" | "none")` is the degenerate-routing knob: "hot" makes every token
pick expert 0 first, "empty" leaves experts top_k.. without any token (for top-1 spellings:
every token goes to expert 0). `make(name, ..., skew=...)` applies it.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# --------------------------------------------------------------------------- helpers


def gelu_tanh_by_hand(x: torch.Tensor) -> torch.Tensor:
    """The tanh GELU written out (GPT-2 / HF NewGELUActivation)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    return torch.tanh(x / cap) * cap


class MLP(nn.Module):
    """fc1 -> act -> fc2."""

    def __init__(self, d_model, d_ff, act=F.relu, bias=False):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff, bias=bias)
        self.fc2 = nn.Linear(d_ff, d_model, bias=bias)
        self.act = act

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), with Llama/Qwen/DeepSeek names."""

    def __init__(self, d_model, d_ff, bias=False):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MixtralExpert(nn.Module):
    """w2(silu(w1(x)) * w3(x)), with Mixtral's names."""

    def __init__(self, d_model, d_ff):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)
        self.w3 = nn.Linear(d_model, d_ff, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def _stacked(*shape, fan_in, scale=1.0):
    return nn.Parameter(torch.randn(*shape) * (scale / math.sqrt(fan_in)))


# --------------------------------------------------------------------------- routers

# Every router takes logits_TR (skew already added) and returns (ids_TK, weights_TK).


def softmax_topk(logits, k, renorm=False):
    weights, ids = logits.softmax(dim=-1).topk(k, dim=-1)
    if renorm:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights


def topk_softmax(logits, k):
    top, ids = logits.topk(k, dim=-1)
    return ids, top.softmax(dim=-1)


def sigmoid_topk(logits, k, renorm=False):
    weights, ids = logits.sigmoid().topk(k, dim=-1)
    if renorm:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights


def softmax_max(logits):
    weights, ids = logits.softmax(dim=-1).max(dim=-1, keepdim=True)
    return ids, weights


def deepseek_v3_route(logits, bias, k, n_group, topk_group, scale):
    """Sigmoid scores; bias only for selection; best topk_group groups; unbiased weights, renormalised, scaled."""
    T, E = logits.shape
    scores = logits.sigmoid()
    choice = scores + bias
    per_group = E // n_group
    group_scores = choice.view(T, n_group, per_group).topk(min(2, per_group), dim=-1)[0].sum(dim=-1)
    group_idx = group_scores.topk(topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
    score_mask = group_mask.unsqueeze(-1).expand(T, n_group, per_group).reshape(T, E)
    choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
    ids = choice.topk(k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, ids)
    weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return ids, weights * scale


def switch_capacity_route(logits, capacity):
    """Top-1 of the softmax; the first `capacity` tokens of each expert kept (cumsum of the one-hot)."""
    probs = logits.softmax(dim=-1)
    weights, ids = probs.max(dim=-1, keepdim=True)
    priority = torch.cumsum(F.one_hot(ids[:, 0], logits.shape[-1]), dim=0)
    keep = (priority <= capacity).gather(1, ids)
    return ids, weights * keep


def capacity_of(num_tokens, num_experts, capacity_factor):
    return max(1, math.ceil(capacity_factor * num_tokens / num_experts))


# --------------------------------------------------------------------------- base


class Spelling(nn.Module):
    """Base: router, skew knob, and the dense reference pieces."""

    ROUTER = "softmax_topk"  # softmax_topk[_renorm], topk_softmax, sigmoid_topk[_renorm], softmax_max,
    #                          switch_capacity, deepseek_v3, llama4, longcat
    TOP1 = False  # fixes top_k = 1
    EXTRA_ROUTES = 0  # router columns past the real experts (LongCat's zero-compute experts)
    ROUTER_BIAS = False
    INPUT_SCALED = False  # the routing weight multiplies the expert's input

    def __init__(self, d_model, d_ff, num_experts, top_k):
        super().__init__()
        self.d_model, self.d_ff, self.num_experts = d_model, d_ff, num_experts
        self.top_k = 1 if self.TOP1 else top_k
        self.num_routes = num_experts + self.EXTRA_ROUTES
        self.router = nn.Linear(d_model, self.num_routes, bias=self.ROUTER_BIAS)
        self.register_buffer("skew", torch.zeros(self.num_routes))

    # -- degenerate-routing knob
    def set_skew(self, mode: str = "none"):
        skew = torch.zeros(self.num_routes)
        if mode == "hot":
            skew[0] = 30.0
        elif mode == "empty":
            skew[self.top_k :] = -30.0
        elif mode != "none":
            raise ValueError(f"skew must be none, hot or empty, not {mode!r}")
        self.skew.copy_(skew)
        return self

    # -- routing
    def router_logits(self, x_TD):
        return self.router(x_TD) + self.skew

    def route(self, x_TD):
        logits = self.router_logits(x_TD)
        kind, k = self.ROUTER, self.top_k
        if kind == "softmax_topk":
            return softmax_topk(logits, k)
        if kind == "softmax_topk_renorm":
            return softmax_topk(logits, k, renorm=True)
        if kind == "topk_softmax":
            return topk_softmax(logits, k)
        if kind == "sigmoid_topk":
            return sigmoid_topk(logits, k)
        if kind == "sigmoid_topk_renorm":
            return sigmoid_topk(logits, k, renorm=True)
        if kind == "softmax_max":
            return softmax_max(logits)
        raise NotImplementedError(kind)

    def gate(self, x_TD):
        ids, weights = self.route(x_TD)
        return torch.zeros(x_TD.shape[0], self.num_routes, dtype=x_TD.dtype, device=x_TD.device).scatter_add(1, ids, weights)

    def routed(self, x_TD):
        ids, weights = self.route(x_TD)
        hit = torch.zeros(x_TD.shape[0], self.num_routes, dtype=x_TD.dtype, device=x_TD.device)
        return hit.scatter_add(1, ids, torch.ones_like(weights))

    # -- reference pieces
    def coefficients(self, x_TD):
        return self.routed(x_TD) if self.INPUT_SCALED else self.gate(x_TD)

    def expert(self, e: int, x_TD):
        raise NotImplementedError

    def expert_outputs(self, x_TD):
        if self.INPUT_SCALED:
            g = self.gate(x_TD)
            return torch.stack([self.expert(e, x_TD * g[:, e, None]) for e in range(self.num_routes)])
        return torch.stack([self.expert(e, x_TD) for e in range(self.num_routes)])

    def shared(self, x_TD):
        return None


class _ListExperts(Spelling):
    """Experts in an nn.ModuleList: f_e = self.experts[e]."""

    def expert(self, e, x_TD):
        return self.experts[e](x_TD)


class _PlainListExperts(Spelling):
    """Experts in a plain Python list, each registered with add_module."""

    def _register(self, make_expert):
        self.expert_list = []
        for e in range(self.num_experts):
            ffn = make_expert()
            self.add_module(f"expert_{e}", ffn)
            self.expert_list.append(ffn)

    def expert(self, e, x_TD):
        return self.expert_list[e](x_TD)


class _DictExperts(Spelling):
    """Experts in an nn.ModuleDict keyed "expert_<e>"."""

    def expert(self, e, x_TD):
        return self.experts[f"expert_{e}"](x_TD)


def _tokens(x):
    return x.reshape(-1, x.shape[-1])


# --------------------------------------------------------------------------- spellings


class Mixtral(_ListExperts):
    """HF Mixtral: softmax-topk-renorm, one_hot mask permuted, torch.where per expert, index_add_."""

    ROUTER = "softmax_topk_renorm"

    def __init__(self, d_model, d_ff, num_experts, top_k):
        super().__init__(d_model, d_ff, num_experts, top_k)
        self.experts = nn.ModuleList([MixtralExpert(d_model, d_ff) for _ in range(num_experts)])

    def forward(self, x):
        hidden = _tokens(x)
        ids, weights = self.route(hidden)
        final = torch.zeros_like(hidden)
        expert_mask = F.one_hot(ids, num_classes=self.num_experts).permute(2, 1, 0)
        for e in range(self.num_experts):
            idx, top_x = torch.where(expert_mask[e])
            current = hidden[None, top_x].reshape(-1, hidden.shape[-1])
            current = self.experts[e](current) * weights[top_x, idx, None]
            final.index_add_(0, top_x, current.to(hidden.dtype))
        return final.reshape(x.shape)


class MixtralExpertHit(_ListExperts):
    """Newer HF loop over only the experts hit (nonzero().tolist()), topk-then-softmax, biased GELU MLPs."""

    ROUTER = "topk_softmax"

    def __init__(self, d_model, d_ff, num_experts, top_k):
        super().__init__(d_model, d_ff, num_experts, top_k)
        self.experts = nn.ModuleList([MLP(d_model, d_ff, F.gelu, bias=True) for _ in range(num_experts)])

    def forward(self, x):
        hidden = _tokens(x)
        ids, weights = self.route(hidden)
        final = torch.zeros_like(hidden)
        expert_mask = F.one_hot(ids, num_classes=self.num_experts).permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in expert_hit.squeeze(-1).tolist():
            idx, top_x = torch.where(expert_mask[e])
            out = self.experts[e](hidden[top_x]) * weights[top_x, idx, None]
            final.index_add_(0, top_x, out)
        return final.reshape(x.shape)


class SwitchMaskAssign(_DictExperts):
    """HF Switch (no capacity): softmax max top-1, out[mask] = expert(x[mask]) into a clone, weight after the combine."""

    ROUTER = "softmax_max"
    TOP1 = True

    def __init__(self, d_model, d_ff, num_experts, top_k):
        super().__init__(d_model, d_ff, num_experts, top_k)
        self.experts = nn.ModuleDict({f"expert_{e}": MLP(d_model, d_ff) for e in range(num_experts)})

    def forward(self, x):
        hidden = _tokens(x)
        probs = (self.router(hidden) + self.skew).softmax(dim=-1)
        router_probs, expert_index = probs.max(dim=-1)
        router_mask = F.one_hot(expert_index, self.num_experts)
        next_states = hidden.clone()
        for idx, expert in enumerate(self.experts.values()):
            token_indices = router_mask[:, idx].bool()
            next_states[token_indices] = expert(hidden[token_indices]).to(next_states.dtype)
        out = router_probs.unsqueeze(-1) * next_states
        return out.reshape(x.shape)


class SwitchCapacity(_ListExperts):
    """Switch with capacity: argmax top-1, cumsum of the one-hot drops tokens past capacity, out[mask] =, weight after."""

    ROUTER = "switch_capacity"
    TOP1 = True
    capacity_factor = 0.5  # small, so ordinary inputs already drop tokens

    def __init__(self, d_model, d_ff, num_experts, top_k):
        super().__init__(d_model, d_ff, num_experts, top_k)
        self.experts = nn.ModuleList([MLP(d_model, d_ff, bias=True) for _ in range(num_experts)])

    def route(self, x_TD):
        capacity = capacity_of(x_TD.shape[0], self.num_experts, self.capacity_factor)
        return switch_capacity_route(self.router_logits(x_TD), capacity)

    def forward(self, x):
        hidden = _tokens(x)
        capacity = capacity_of(hidden.shape[0], self.num_experts, self.capacity_factor)
        probs = (self.router(hidden) + self.skew).softmax(dim=-1)
        expert_index = torch.argmax(probs, dim=-1)
        expert_mask = F.one_hot(expert_index, self.num_experts)
        token_priority = torch.cumsum(expert_mask, dim=0)
        expert_mask = expert_mask * (token_priority <= capacity)
        router_probs = probs.max(dim=-1).values
        out = torch.zeros_like(hidden)
        for e, expert in enumerate(self.experts):
            token_indices = expert_mask[:, e].bool()
            out[token_indices] = expert(hidden[token_indices])
        out = out * router_probs[:, None]
        return out.reshape(x.shape)


class GShardEinsumCapacity(Spelling):
    """GShard/Mesh-TF: top-1 with capacity, dispatch/combine tensors [T, E, C], einsum into [E, C, D], stacked einsum experts."""

    ROUTER = "switch_capacity"
    TOP1 = True
    capacity_factor = 0.75

    def __init__(self, d_model, d_ff, num_experts, top_k):
        super().__init__(d_model, d_ff, num_experts, top_k)
        self.w1 = _stacked(num_experts, d_model, d_ff, fan_in=d_model)
        self.w2 = _stacked(num_experts, d_ff, d_model, fan_in=d_ff)

    def route(self, x_TD):
        capacity = capacity_of(x_TD.shape[0], self.num_experts, self.capacity_factor)
        return switch_capacity_route(self.router_logits(x_TD), capacity)

    def expert(self, e, x_TD):
        return F.gelu(x_TD @ self.w1[e], approximate="tanh") @ self.w2[e]

    def forward(self, x):
        hidden = _tokens(x)
        T, E = hidden.shape[0], self.num_experts
        C = capacity_of(T, E, self.capacity_factor)
        probs = (self.router(hidden) + self.skew).softmax(dim=-1)
        gate, index = probs.max(dim=-1)
        mask = F.one_hot(index, E)
        position = torch.cumsum(mask, dim=0) - 1
        mask = mask * (position < C)
        position = (position * mask).sum(dim=-1)
        dispatch = mask.unsqueeze(-1).to(hidden.dtype) * F.one_hot(position, C).unsqueeze(1).to(hidden.dtype)
        combine = dispatch * gate[:, None, None]
        x_ECD = torch.einsum("tec,td->ecd", dispatch, hidden)
        h_ECF = F.gelu(torch.einsum("ecd,edf->ecf", x_ECD, self.w1), approximate="tanh")
        y_ECD = torch.einsum("ecf,efd->ecd", h_ECF, self.w2)
        out = torch.einsum("tec,ecd->td", combine, y_ECD)
        return out.reshape(x.shape)


class MaskAddAssign(_ListExperts):
    """Boolean mask per expert: out[routed] += expert(x[routed]) * w; gated MLP experts with biases, softmax-topk."""

    ROUTER = "softmax_topk"

    def __init__(self, d_model, d_ff, num_experts, top_k):
        super().__init__(d_model, d_ff, num_experts, top_k)
        self.experts = nn.ModuleList([GatedMLP(d_model, d_ff, bias=True) for _ in range(num_experts)])

    def forward(self, x):
        hidden = _tokens(x)
        ids, weights = self.route(hidden)
        out = torch.zeros_like(hidden)
        for e, expert in enumerate(self.experts):
            hit = ids == e
            routed = hit.any(dim=-1)
            w_e = (weights * hit).sum(dim=-1)
            out[routed] += expert(hidden[routed]) * w_e[routed].unsqueeze(-1)
        return out.reshape(x.shape)


class NonzeroIndexSelect(_PlainListExperts):
    """nonzero() positions, x.index_select, index_add_; plain list + add_module, hand-written tanh GELU, sigmoid-topk."""

    ROUTER = "sigmoid_topk"

    def __init__(self, d_model, d_ff, num_experts, top_k):
        super().__init__(d_model, d_ff, num_experts, top_k)
        self._register(lambda: MLP(d_model, d_ff, gelu_tanh_by_hand, bias=True))

    def forward(self, x):
        hidden = _tokens(x)
        ids, weights = self.route(hidden)
        out = torch.zeros_like(hidden)
        for e, expert in enumerate(self.expert_list):
            pos = (ids == e).nonzero()
            token = pos[:, 0]
            y = expert(hidden.index_select(0, token)) * weights[pos[:, 0], pos[:, 1]].unsqueeze(-1)
            out.index_add_(0, token, y)
        return out.reshape(x.shape)


class NonzeroAsTupleSequential(_ListExperts):
    """nonzero(as_tuple=True) rows and slots, nn.Sequential SiLU experts with biases, scatter_add_ by expanded rows."""

    ROUTER = "softmax_topk_renorm"

    def __init__(self, d_model, d_ff, num_experts, top_k):
        super().__init__(d_model, d_ff, num_experts, top_k)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(d_model, d_ff), nn.SiLU(), nn.Linear(d_ff, d_model))
                                     for _ in range(num_experts))

    def forward(self, x):
        hidden = _tokens(x)
        ids, weights = self.route(hidden)
        out = torch.zeros_like(hidden)
        for e, expert in enumerate(self.experts):
            rows, slots = torch.nonzero(ids == e, as_tuple=True)
            y = expert(hidden[rows]) * weights[rows, slots].unsqueeze(-1)
            out.scatter_add_(0, rows[:, None].expand(-1, hidden.shape[-1]), y)
        return out.reshape(x.shape)


class GatherScatterAdd(Spelling):
    """torch.gather of token rows, scatter_add_ back; stacked [E, F, D] weights used through F.linear(x, w[e]) (SwiGLU)."""

    ROUTER = "softmax_topk_renorm"

    def __init__(self, d_model, d_ff, num_experts, top_k):
        super().__init__(d_model, d_ff, num_experts, top_k)
        self.gate_proj = _stacked(num_experts, d_ff, d_model, fan_in=d_model)  # nn.Linear layout [out, in]
        self.up_proj = _stacked(num_experts, d_ff, d_model, fan_in=d_model)
        self.down_proj = _stacked(num_experts, d_model, d_ff, fan_in=d_ff)

    def expert(self, e, x_TD):
        return F.linear(F.silu(F.linear(x_TD, self.gate_proj[e])) * F.linear(x_TD, self.up_proj[e]), self.down_proj[e])

    def forward(self, x):
        hidden = _tokens(x)
        ids, weights = self.route(hidden)
        flat_ids, flat_w = ids.reshape(-1), weights.reshape(-1)
        out = torch.zeros_like(hidden)
        for e in range(self.num_experts):
            pos = torch.nonzero(flat_ids == e).squeeze(-1)
            index = (pos // self.top_k).unsqueeze(-1).expand(-1, hidden.shape[-1])
            x_e = torch.gather(hidden, 0, index)
            h = F.silu(F.linear(x_e, self.gate_proj[e])) * F.linear(x_e, self.up_proj[e])
            y = F.linear(h, self.down_proj[e]) * flat_w[pos].unsqueeze(-1)
            out.scatter_add_(0, index, y)
        return out.reshape(x.shape)


class _DeepSeekV3Router(Spelling):
    ROUTER = "deepseek_v3"
    routed_scaling_factor = 2.5

    def _init_router(self):
        self.register_buffer("e_score_correction_bias", torch.randn(self.num_experts) * 0.1)
        E = self.num_experts
        self.n_group = 2 if E % 2 == 0 and E >= 4 else 1
        per_group = E // self.n_group
        self.topk_group = max(1, self.n_group // 2)
        while self.topk_group * per_group < self.top_k:
            self.topk_group += 1

    def route(self, x_TD):
        return deepseek_v3_route(self.router_logits(x_TD), self.e_score_correction_bias, self.top_k,
                                 self.n_group, self.topk_group, self.routed_scaling_factor)

    def expert(self, e, x_TD):
        return self.experts[e](x_TD)

    def shared(self, x_TD):
        return self.shared_experts(x_TD)


class DeepSeekV3MoeInfer(_DeepSeekV3Router):
    """DeepSeek-V3 moe_infer: group-limited sigmoid router, argsort tokens by expert, slice per expert count, new_x[idxs] = outs, + shared."""

    def __init__(self, d_model, d_ff, num_experts, top_k):
        super().__init__(d_model, d_ff, num_experts, top_k)
        self._init_router()
        self.experts = nn.ModuleList([GatedMLP(d_model, d_ff) for _ in range(num_experts)])
        self.shared_experts = GatedMLP(d_model, 2 * d_ff)

    def forward(self, x):
        hidden = _tokens(x)
        topk_ids, topk_weight = self.route(hidden)
        cnts = topk_ids.new_zeros((topk_ids.shape[0], self.num_experts))
        cnts.scatter_(1, topk_ids, 1)
        tokens_per_expert = cnts.sum(dim=0)
        idxs = topk_ids.view(-1).argsort()
        sorted_tokens = hidden[idxs // topk_ids.shape[1]]
        outputs, start_idx = [], 0
        for i, num_tokens in enumerate(tokens_per_expert.tolist()):
            end_idx = start_idx + num_tokens
            if num_tokens == 0:
                continue
            outputs.append(self.experts[i](sorted_tokens[start_idx:end_idx]))
            start_idx = end_idx
        outs = torch.cat(outputs, dim=0) if outputs else sorted_tokens.new_empty(0)
        new_x = torch.empty_like(outs)
        new_x[idxs] = outs
        y = new_x.view(*topk_ids.shape, -1).mul_(topk_weight.unsqueeze(dim=-1)).sum(dim=1)
        return (y + self.shared_experts(hidden)).reshape(x.shape)


class DeepSeekV3IndexAdd(_DeepSeekV3Router):
    """Newer HF DeepseekV3MoE.moe: one_hot [E, T, K], torch.where, `if numel() > 0`, index_add_, + shared experts."""

    def __init__(self, d_model, d_ff, num_experts, top_k):
        super().__init__(d_model, d_ff, num_experts, top_k)
        self._init_router()
        self.experts = nn.ModuleList([GatedMLP(d_model, d_ff) for _ in range(num_experts)])
        self.shared_experts = GatedMLP(d_model, d_ff)

    def forward(self, x):
        hidden = _tokens(x)
        residuals = hidden
        topk_indices, topk_weights = self.route(hidden)
        final = torch.zeros_like(hidden, dtype=topk_weights.dtype)
        expert_mask = F.one_hot(topk_indices, num_classes=self.num_experts).permute(2, 0, 1)
        for e in range(self.num_experts):
            token_indices, weight_indices = torch.where(expert_mask[e])
            if token_indices.numel() > 0:
                out = self.experts[e](hidden[token_indices])
                final.index_add_(0, token_indices, out * topk_weights[token_indices, weight_indices].unsqueeze(-1))
        return (final.type(hidden.dtype) + self.shared_experts(residuals)).reshape(x.shape)


class DenseStackSum(_ListExperts):
    """Dense: every expert on every token, torch.stack(dim=1), weighted sum with a scattered [T, E] gate."""

    ROUTER = "softmax_topk_renorm"

    def __init__(self, d_model, d_ff, num_experts, top_k):
        super().__init__(d_model, d_ff, num_experts, top_k)
        self.experts = nn.ModuleList([MLP(d_model, d_ff, F.silu, bias=True) for _ in range(num_experts)])

    def forward(self, x):
        hidden = _tokens(x)
        ids, weights = self.route(hidden)
        gate = torch.zeros(hidden.shape[0], self.num_experts, dtype=hidden.dtype, device=hidden.device).scatter(1, ids, weights)
        stacked = torch.stack([expert(hidden) for expert in self.experts], dim=1)
        return (stacked * gate.unsqueeze(-1)).sum(dim=1).reshape(x.shape)


class DenseEinsumStack(_DictExperts):
    """Dense: ModuleDict experts stacked [T, E, D], gate = softmax of -inf-masked top-k logits, einsum("te,ted->td")."""

    ROUTER = "topk_softmax"

    def __init__(self, d_model, d_ff, num_experts, top_k):
        super().__init__(d_model, d_ff, num_experts, top_k)
        act = lambda h: F.gelu(h, approximate="tanh")  # noqa: E731
        self.experts = nn.ModuleDict({f"expert_{e}": MLP(d_model, d_ff, act) for e in range(num_experts)})

    def forward(self, x):
        hidden = _tokens(x)
        logits = self.router(hidden) + self.skew
        top, ids = logits.topk(self.top_k, dim=-1)
        gate = torch.full_like(logits, float("-inf")).scatter(1, ids, top).softmax(dim=-1)
        stacked = torch.stack([self.experts[name](hidden) for name in self.experts], dim=1)
        return torch.einsum("te,ted->td", gate, stacked).reshape(x.shape)


class DenseMaskedLoop(_PlainListExperts):
    """Dense loop out = out + expert(x) * gate[:, e:e+1] with zeroed weights; sigmoid-topk-renorm via a scattered mask; SwiGLU."""

    ROUTER = "sigmoid_topk_renorm"

    def __init__(self, d_model, d_ff, num_experts, top_k):
        super().__init__(d_model, d_ff, num_experts, top_k)
        self._register(lambda: MixtralExpert(d_model, d_ff))

    def forward(self, x):
        hidden = _tokens(x)
        scores = (self.router(hidden) + self.skew).sigmoid()
        ids = scores.topk(self.top_k, dim=-1).indices
        mask = torch.zeros_like(scores).scatter(1, ids, 1.0)
        gate = scores * mask
        gate = gate / gate.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(hidden)
        for e, expert in enumerate(self.expert_list):
            out = out + expert(hidden) * gate[:, e : e + 1]
        return out.reshape(x.shape)


class MatmulStackedDense(Spelling):
    """Dense stacked w1[E, D, F] + b1, w2[E, F, D] + b2 through broadcast torch.matmul, sum over E with gate.T."""

    ROUTER = "softmax_topk"

    def __init__(self, d_model, d_ff, num_experts, top_k):
        super().__init__(d_model, d_ff, num_experts, top_k)
        self.w1 = _stacked(num_experts, d_model, d_ff, fan_in=d_model)
        self.b1 = nn.Parameter(torch.randn(num_experts, d_ff) * 0.1)
        self.w2 = _stacked(num_experts, d_ff, d_model, fan_in=d_ff)
        self.b2 = nn.Parameter(torch.randn(num_experts, d_model) * 0.1)

    def expert(self, e, x_TD):
        return F.relu(x_TD @ self.w1[e] + self.b1[e]) @ self.w2[e] + self.b2[e]

    def forward(self, x):
        hidden = _tokens(x)
        ids, weights = self.route(hidden)
        gate = torch.zeros(hidden.shape[0], self.num_experts, dtype=hidden.dtype, device=hidden.device).scatter(1, ids, weights)
        h = F.relu(torch.matmul(hidden.unsqueeze(0), self.w1) + self.b1.unsqueeze(1))  # [E, T, F]
        y = torch.matmul(h, self.w2) + self.b2.unsqueeze(1)  # [E, T, D]
        return (y * gate.t().unsqueeze(-1)).sum(dim=0).reshape(x.shape)


class _GptOss(Spelling):
    ROUTER = "topk_softmax"
    ROUTER_BIAS = True
    alpha, limit = 1.702, 7.0

    def _init_experts(self):
        E, D, Fd = self.num_experts, self.d_model, self.d_ff
        self.gate_up_proj = _stacked(E, D, 2 * Fd, fan_in=D, scale=4.0)  # gate/up interleaved: [..., ::2], [..., 1::2]
        self.gate_up_proj_bias = nn.Parameter(torch.randn(E, 2 * Fd) * 0.5)
        self.down_proj = _stacked(E, Fd, D, fan_in=Fd, scale=0.1)
        self.down_proj_bias = nn.Parameter(torch.randn(E, D) * 0.1)

    def _glu(self, gate_up):
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        gate = gate.clamp(min=None, max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        glu = gate * torch.sigmoid(gate * self.alpha)
        return (up + 1) * glu

    def expert(self, e, x_TD):
        h = self._glu(x_TD @ self.gate_up_proj[e] + self.gate_up_proj_bias[e])
        return h @ self.down_proj[e] + self.down_proj_bias[e]

    def _routing_weights(self, hidden):
        logits = self.router(hidden) + self.skew
        top_value, top_index = torch.topk(logits, self.top_k, dim=-1)
        top_value = F.softmax(top_value, dim=1, dtype=top_value.dtype)
        return top_index, torch.zeros_like(logits).scatter_(1, top_index, top_value)


class GptOss(_GptOss):
    """GPT-OSS loop: biased router, topk-then-softmax, x @ gate_up_proj[e] + bias, clamped SwiGLU, index_add_."""

    def __init__(self, d_model, d_ff, num_experts, top_k):
        super().__init__(d_model, d_ff, num_experts, top_k)
        self._init_experts()

    def forward(self, x):
        hidden = _tokens(x)
        router_indices, routing_weights = self._routing_weights(hidden)
        next_states = torch.zeros_like(hidden)
        expert_mask = F.one_hot(router_indices, num_classes=self.num_experts).permute(2, 1, 0)
        for expert_idx in range(self.num_experts):
            _, token_idx = torch.where(expert_mask[expert_idx])
            current_state = hidden[token_idx]
            gate_up = current_state @ self.gate_up_proj[expert_idx] + self.gate_up_proj_bias[expert_idx]
            gate, up = gate_up[..., ::2], gate_up[..., 1::2]
            gate = gate.clamp(min=None, max=self.limit)
            up = up.clamp(min=-self.limit, max=self.limit)
            glu = gate * torch.sigmoid(gate * self.alpha)
            gated_output = (up + 1) * glu
            out = gated_output @ self.down_proj[expert_idx] + self.down_proj_bias[expert_idx]
            weighted_output = out * routing_weights[token_idx, expert_idx, None]
            next_states.index_add_(0, token_idx, weighted_output.to(hidden.dtype))
        return next_states.reshape(x.shape)


class GptOssDenseBmm(_GptOss):
    """GPT-OSS inference path: x.repeat(E, 1) through torch.bmm for all experts, clamped SwiGLU, weight by dense gate, sum(0)."""

    def __init__(self, d_model, d_ff, num_experts, top_k):
        super().__init__(d_model, d_ff, num_experts, top_k)
        self._init_experts()

    def forward(self, x):
        hidden = _tokens(x)
        T, E = hidden.shape[0], self.num_experts
        _, routing_weights = self._routing_weights(hidden)
        states = hidden.repeat(E, 1).view(E, -1, self.d_model)
        gate_up = torch.bmm(states, self.gate_up_proj) + self.gate_up_proj_bias[..., None, :]
        next_states = torch.bmm(self._glu(gate_up), self.down_proj) + self.down_proj_bias[..., None, :]
        next_states = next_states * routing_weights.transpose(0, 1).view(E, T)[..., None]
        return next_states.sum(dim=0).reshape(x.shape)


class GatheredWeightsEinsum(Spelling):
    """Per-token gathered weights w[ids] -> [T, K, D, F], einsum over tokens and slots (SwiGLU), sigmoid-topk-renorm."""

    ROUTER = "sigmoid_topk_renorm"

    def __init__(self, d_model, d_ff, num_experts, top_k):
        super().__init__(d_model, d_ff, num_experts, top_k)
        self.w_gate = _stacked(num_experts, d_model, d_ff, fan_in=d_model)
        self.w_up = _stacked(num_experts, d_model, d_ff, fan_in=d_model)
        self.w_down = _stacked(num_experts, d_ff, d_model, fan_in=d_ff)

    def expert(self, e, x_TD):
        return (F.silu(x_TD @ self.w_gate[e]) * (x_TD @ self.w_up[e])) @ self.w_down[e]

    def forward(self, x):
        hidden = _tokens(x)
        ids, weights = self.route(hidden)
        g = torch.einsum("td,tkdf->tkf", hidden, self.w_gate[ids])
        u = torch.einsum("td,tkdf->tkf", hidden, self.w_up[ids])
        y = torch.einsum("tkf,tkfd->tkd", F.silu(g) * u, self.w_down[ids])
        return torch.einsum("tk,tkd->td", weights, y).reshape(x.shape)


class GatheredBiasTop1(Spelling):
    """Top-1 by max, weights [E, out, in] and biases gathered by the ids, einsum("td,tfd->tf"), GELU, weight after."""

    ROUTER = "softmax_max"
    TOP1 = True

    def __init__(self, d_model, d_ff, num_experts, top_k):
        super().__init__(d_model, d_ff, num_experts, top_k)
        self.fc1 = _stacked(num_experts, d_ff, d_model, fan_in=d_model)
        self.fc1_bias = _stacked(num_experts, d_ff, fan_in=d_ff)
        self.fc2 = _stacked(num_experts, d_model, d_ff, fan_in=d_ff)
        self.fc2_bias = _stacked(num_experts, d_model, fan_in=d_model)

    def expert(self, e, x_TD):
        return F.gelu(x_TD @ self.fc1[e].T + self.fc1_bias[e]) @ self.fc2[e].T + self.fc2_bias[e]

    def forward(self, x):
        hidden = _tokens(x)
        ids_T1, weights_T1 = self.route(hidden)
        ids_T = ids_T1[:, 0]
        h = F.gelu(torch.einsum("td,tfd->tf", hidden, self.fc1[ids_T]) + self.fc1_bias[ids_T])
        y = torch.einsum("tf,tdf->td", h, self.fc2[ids_T]) + self.fc2_bias[ids_T]
        return (y * weights_T1).reshape(x.shape)


class SplitParallelExperts(Spelling):
    """JetMoE-style: (token, slot) rows sorted by expert, x.split(counts.tolist()), a linear per chunk, cat, twice
    around a fused SwiGLU; weighted and index_add_'ed back by token; counts from one_hot(ids).sum(0)."""

    ROUTER = "topk_softmax"

    def __init__(self, d_model, d_ff, num_experts, top_k):
        super().__init__(d_model, d_ff, num_experts, top_k)
        self.w_in = _stacked(num_experts, 2 * d_ff, d_model, fan_in=d_model)
        self.w_out = _stacked(num_experts, d_model, d_ff, fan_in=d_ff)

    def expert(self, e, x_TD):
        gate, up = F.linear(x_TD, self.w_in[e]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.w_out[e])

    def _grouped(self, rows_SD, weight, expert_size):
        chunks = rows_SD.split(expert_size, dim=0)
        return torch.cat([F.linear(chunks[e], weight[e]) for e in range(self.num_experts)], dim=0)

    def forward(self, x):
        hidden = _tokens(x)
        ids, weights = self.route(hidden)
        expert_size = F.one_hot(ids, self.num_experts).sum(dim=(0, 1)).tolist()
        _, order = ids.flatten().sort(0)
        token = order.div(self.top_k, rounding_mode="trunc")
        gate, up = self._grouped(hidden[token], self.w_in, expert_size).chunk(2, dim=-1)
        y = self._grouped(F.silu(gate) * up, self.w_out, expert_size) * weights.flatten()[order, None]
        return torch.zeros_like(hidden).index_add(0, token, y).reshape(x.shape)


class EinsumStackedArgmax(Spelling):
    """Top-1 by argmax, gate = one_hot * probs, dense stacked experts via einsum("td,edf->etf"), einsum("te,etd->td")."""

    ROUTER = "softmax_max"
    TOP1 = True

    def __init__(self, d_model, d_ff, num_experts, top_k):
        super().__init__(d_model, d_ff, num_experts, top_k)
        self.w1 = _stacked(num_experts, d_model, d_ff, fan_in=d_model)
        self.w2 = _stacked(num_experts, d_ff, d_model, fan_in=d_ff)

    def expert(self, e, x_TD):
        return F.relu(x_TD @ self.w1[e]) @ self.w2[e]

    def forward(self, x):
        hidden = _tokens(x)
        logits = self.router(hidden) + self.skew
        ids = logits.argmax(dim=-1)
        gate = F.one_hot(ids, self.num_experts).to(hidden.dtype) * logits.softmax(dim=-1)
        h = F.relu(torch.einsum("td,edf->etf", hidden, self.w1))
        y = torch.einsum("etf,efd->etd", h, self.w2)
        return torch.einsum("te,etd->td", gate, y).reshape(x.shape)


class Llama4(Spelling):
    """Llama4: top-1 logit, sigmoid of a -inf-filled score scales x.repeat(E, 1) before bmm SwiGLU experts, sum(0), + shared."""

    ROUTER = "llama4"
    TOP1 = True
    INPUT_SCALED = True

    def __init__(self, d_model, d_ff, num_experts, top_k):
        super().__init__(d_model, d_ff, num_experts, top_k)
        self.gate_up_proj = _stacked(num_experts, d_model, 2 * d_ff, fan_in=d_model)  # gate, up = chunk(2)
        self.down_proj = _stacked(num_experts, d_ff, d_model, fan_in=d_ff)
        self.shared_expert = GatedMLP(d_model, d_ff)

    def route(self, x_TD):
        top, ids = self.router_logits(x_TD).topk(1, dim=-1)
        return ids, top.float().sigmoid().to(x_TD.dtype)  # the router's sigmoid in float32, as forward has it

    def expert(self, e, x_TD):
        gate, up = (x_TD @ self.gate_up_proj[e]).chunk(2, dim=-1)
        return (up * F.silu(gate)) @ self.down_proj[e]

    def shared(self, x_TD):
        return self.shared_expert(x_TD)

    def forward(self, x):
        hidden = _tokens(x)
        router_logits = self.router(hidden) + self.skew
        router_top_value, router_indices = torch.topk(router_logits, self.top_k, dim=1)
        router_scores = torch.full_like(router_logits, float("-inf")).scatter_(1, router_indices, router_top_value)
        router_scores = torch.sigmoid(router_scores.transpose(0, 1).float()).to(hidden.dtype)
        routed_in = hidden.repeat(self.num_experts, 1) * router_scores.reshape(-1, 1)
        states = routed_in.view(self.num_experts, -1, self.d_model)
        gate, up = torch.bmm(states, self.gate_up_proj).chunk(2, dim=-1)
        routed_out = torch.bmm(up * F.silu(gate), self.down_proj).view(-1, self.d_model)
        out = self.shared_expert(hidden)
        out = out + routed_out.reshape(self.num_experts, -1, self.d_model).sum(dim=0)
        return out.reshape(x.shape)


class Qwen2Moe(_ListExperts):
    """Qwen2-MoE: softmax-topk (no renorm), where + index_add_, + sigmoid(shared_expert_gate(x)) * shared_expert(x)."""

    ROUTER = "softmax_topk"

    def __init__(self, d_model, d_ff, num_experts, top_k):
        super().__init__(d_model, d_ff, num_experts, top_k)
        self.experts = nn.ModuleList([GatedMLP(d_model, d_ff) for _ in range(num_experts)])
        self.shared_expert = GatedMLP(d_model, 2 * d_ff)
        self.shared_expert_gate = nn.Linear(d_model, 1, bias=False)

    def shared(self, x_TD):
        return torch.sigmoid(self.shared_expert_gate(x_TD)) * self.shared_expert(x_TD)

    def forward(self, x):
        hidden = _tokens(x)
        ids, weights = self.route(hidden)
        final = torch.zeros_like(hidden)
        expert_mask = F.one_hot(ids, num_classes=self.num_experts).permute(2, 1, 0)
        for e in range(self.num_experts):
            idx, top_x = torch.where(expert_mask[e])
            final.index_add_(0, top_x, self.experts[e](hidden[top_x]) * weights[top_x, idx, None])
        shared = F.sigmoid(self.shared_expert_gate(hidden)) * self.shared_expert(hidden)
        return (final + shared).reshape(x.shape)


class LongCatZeroExperts(Spelling):
    """LongCat-Flash: router over E real + 2 zero-compute experts (identity, zero), selection bias, scaled weights, index_add_."""

    ROUTER = "longcat"
    EXTRA_ROUTES = 2  # id E: identity (returns its input), id E+1: zero (returns 0)
    routed_scaling_factor = 1.5

    def __init__(self, d_model, d_ff, num_experts, top_k):
        super().__init__(d_model, d_ff, num_experts, top_k)
        self.experts = nn.ModuleList([MixtralExpert(d_model, d_ff) for _ in range(num_experts)])
        self.register_buffer("e_score_correction_bias", torch.randn(self.num_routes) * 0.05)

    def route(self, x_TD):
        scores = self.router_logits(x_TD).softmax(dim=-1)
        ids = torch.topk(scores + self.e_score_correction_bias, self.top_k, dim=-1, sorted=False)[1]
        return ids, scores.gather(1, ids) * self.routed_scaling_factor

    def expert(self, e, x_TD):
        if e < self.num_experts:
            return self.experts[e](x_TD)
        return x_TD if e == self.num_experts else torch.zeros_like(x_TD)

    def forward(self, x):
        hidden = _tokens(x)
        ids, weights = self.route(hidden)
        out = torch.zeros_like(hidden)
        for e in range(self.num_routes):
            token, slot = torch.where(ids == e)
            if e < self.num_experts:
                y = self.experts[e](hidden[token])
            elif e == self.num_experts:  # identity expert
                y = hidden[token]
            else:  # zero expert: contributes nothing
                continue
            out.index_add_(0, token, y * weights[token, slot].unsqueeze(-1))
        return out.reshape(x.shape)


class ScaledExpert(nn.Module):
    """up -> act -> * routing weight -> down (no down bias, so the weight commutes out)."""

    def __init__(self, d_model, d_ff):
        super().__init__()
        self.up = nn.Linear(d_model, d_ff, bias=True)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x, weight):
        return self.down(F.gelu(self.up(x)) * weight)


class WeightInsideExpert(_ListExperts):
    """Routing weight applied between the projections, expert(x[tok], w[:, None]); torch.where + index_add_, sigmoid-topk."""

    ROUTER = "sigmoid_topk"

    def __init__(self, d_model, d_ff, num_experts, top_k):
        super().__init__(d_model, d_ff, num_experts, top_k)
        self.experts = nn.ModuleList([ScaledExpert(d_model, d_ff) for _ in range(num_experts)])

    def expert(self, e, x_TD):
        return self.experts[e](x_TD, 1.0)

    def forward(self, x):
        hidden = _tokens(x)
        ids, weights = self.route(hidden)
        out = torch.zeros_like(hidden)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(ids == e)
            out.index_add_(0, token, expert(hidden[token], weights[token, slot].unsqueeze(-1)))
        return out.reshape(x.shape)


class WeightBeforeExpert(_DictExperts):
    """Routing weight scales the input, expert(x[m] * w); boolean dispatch, out[m] = out[m] + y; ModuleDict SwiGLU."""

    ROUTER = "softmax_topk_renorm"
    INPUT_SCALED = True

    def __init__(self, d_model, d_ff, num_experts, top_k):
        super().__init__(d_model, d_ff, num_experts, top_k)
        self.experts = nn.ModuleDict({f"expert_{e}": GatedMLP(d_model, d_ff) for e in range(num_experts)})

    def forward(self, x):
        hidden = _tokens(x)
        ids, weights = self.route(hidden)
        out = torch.zeros_like(hidden)
        for e in range(self.num_experts):
            hit = ids == e
            m = hit.any(dim=-1)
            w_e = (weights * hit).sum(dim=-1, keepdim=True)
            y = self.experts[f"expert_{e}"](hidden[m] * w_e[m])
            out[m] = out[m] + y
        return out.reshape(x.shape)


class SoftcapExpert(nn.Module):
    """up -> tanh soft-cap -> GELU -> down."""

    def __init__(self, d_model, d_ff, cap):
        super().__init__()
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)
        self.cap = cap
        with torch.no_grad():
            self.up.weight.mul_(3.0)  # pre-activations well past the cap

    def forward(self, x):
        h = self.up(x)
        h = torch.tanh(h / self.cap) * self.cap
        return self.down(F.gelu(h))


class SoftcapFFN(_DictExperts):
    """Soft-capped experts (tanh(h / c) * c between projections), ModuleDict, boolean dispatch, out[m] +=, topk-softmax."""

    ROUTER = "topk_softmax"
    cap = 1.0

    def __init__(self, d_model, d_ff, num_experts, top_k):
        super().__init__(d_model, d_ff, num_experts, top_k)
        self.experts = nn.ModuleDict({f"expert_{e}": SoftcapExpert(d_model, d_ff, self.cap) for e in range(num_experts)})

    def forward(self, x):
        hidden = _tokens(x)
        ids, weights = self.route(hidden)
        out = torch.zeros_like(hidden)
        for name, expert in self.experts.items():
            e = int(name.split("_")[1])
            hit = ids == e
            m = hit.any(dim=-1)
            out[m] += expert(hidden[m]) * (weights * hit).sum(dim=-1)[m, None]
        return out.reshape(x.shape)


class ArgmaxIndexAssign(_PlainListExperts):
    """Top-1 by probs.max, integer index from torch.where(ids == e)[0], out[idx] = expert(x[idx]) * w[idx]; plain list."""

    ROUTER = "softmax_max"
    TOP1 = True

    def __init__(self, d_model, d_ff, num_experts, top_k):
        super().__init__(d_model, d_ff, num_experts, top_k)
        self._register(lambda: MLP(d_model, d_ff, bias=True))

    def forward(self, x):
        hidden = _tokens(x)
        probs = (self.router(hidden) + self.skew).softmax(dim=-1)
        w, ids = probs.max(dim=-1)
        out = torch.zeros_like(hidden)
        for e, expert in enumerate(self.expert_list):
            idx = torch.where(ids == e)[0]
            out[idx] = expert(hidden[idx]) * w[idx, None]
        return out.reshape(x.shape)


class IndexPutAccumulate(Spelling):
    """nonzero(as_tuple=True) dispatch, out.index_put_((tok,), y, accumulate=True); stacked [E, D, F] via torch.matmul(x, w1[e])."""

    ROUTER = "sigmoid_topk_renorm"

    def __init__(self, d_model, d_ff, num_experts, top_k):
        super().__init__(d_model, d_ff, num_experts, top_k)
        self.w1 = _stacked(num_experts, d_model, d_ff, fan_in=d_model)
        self.w2 = _stacked(num_experts, d_ff, d_model, fan_in=d_ff)

    def expert(self, e, x_TD):
        return F.silu(x_TD @ self.w1[e]) @ self.w2[e]

    def forward(self, x):
        hidden = _tokens(x)
        ids, weights = self.route(hidden)
        out = torch.zeros_like(hidden)
        for e in range(self.num_experts):
            tok, slot = (ids == e).nonzero(as_tuple=True)
            y = torch.matmul(F.silu(torch.matmul(hidden[tok], self.w1[e])), self.w2[e])
            out.index_put_((tok,), y * weights[tok, slot].unsqueeze(-1), accumulate=True)
        return out.reshape(x.shape)


class SortedSplit(_ListExperts):
    """Grouped: stable argsort of ids, bincount(...).tolist(), torch.split into per-expert chunks, cat, index_add_ by token."""

    ROUTER = "softmax_topk_renorm"

    def __init__(self, d_model, d_ff, num_experts, top_k):
        super().__init__(d_model, d_ff, num_experts, top_k)
        self.experts = nn.ModuleList([MLP(d_model, d_ff, F.gelu, bias=True) for _ in range(num_experts)])

    def forward(self, x):
        hidden = _tokens(x)
        ids, weights = self.route(hidden)
        flat_ids = ids.flatten()
        order = flat_ids.argsort(stable=True)
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()
        token = order // self.top_k
        chunks = torch.split(hidden[token], counts)
        y = torch.cat([expert(chunk) for expert, chunk in zip(self.experts, chunks)])
        out = torch.zeros_like(hidden).index_add_(0, token, y * weights.flatten()[order].unsqueeze(-1))
        return out.reshape(x.shape)


# --------------------------------------------------------------------------- registry

SPELLINGS: dict[str, type] = {
    "mixtral": Mixtral,
    "mixtral_expert_hit": MixtralExpertHit,
    "switch_mask_assign": SwitchMaskAssign,
    "switch_capacity": SwitchCapacity,
    "gshard_einsum_capacity": GShardEinsumCapacity,
    "mask_add_assign": MaskAddAssign,
    "nonzero_index_select": NonzeroIndexSelect,
    "nonzero_as_tuple_sequential": NonzeroAsTupleSequential,
    "gather_scatter_add": GatherScatterAdd,
    "deepseek_v3_moe_infer": DeepSeekV3MoeInfer,
    "deepseek_v3_index_add": DeepSeekV3IndexAdd,
    "dense_stack_sum": DenseStackSum,
    "dense_einsum_stack": DenseEinsumStack,
    "dense_masked_loop": DenseMaskedLoop,
    "matmul_stacked_dense": MatmulStackedDense,
    "gpt_oss": GptOss,
    "gpt_oss_dense_bmm": GptOssDenseBmm,
    "gathered_weights_einsum": GatheredWeightsEinsum,
    "gathered_bias_top1": GatheredBiasTop1,
    "split_parallel_experts": SplitParallelExperts,
    "einsum_stacked_argmax": EinsumStackedArgmax,
    "llama4": Llama4,
    "qwen2_moe": Qwen2Moe,
    "longcat_zero_experts": LongCatZeroExperts,
    "weight_inside_expert": WeightInsideExpert,
    "weight_before_expert": WeightBeforeExpert,
    "softcap_ffn": SoftcapFFN,
    "argmax_index_assign": ArgmaxIndexAssign,
    "index_put_accumulate": IndexPutAccumulate,
    "sorted_split": SortedSplit,
}


def make(name, d_model=16, d_ff=32, num_experts=4, top_k=2, seed=0, skew="none") -> nn.Module:
    """Build spelling `name` with weights drawn from `seed` (the global RNG is left as it was), eval, float32."""
    cls = SPELLINGS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = cls(d_model, d_ff, num_experts, top_k)
    module.set_skew(skew)
    return module.float().eval()


@torch.no_grad()
def reference(module: Spelling, x: torch.Tensor) -> torch.Tensor:
    """sum_e c[:, e] * y_ETD[e] + shared, from the module's dense pieces; x of any leading shape."""
    x_TD = _tokens(x)
    c_TE = module.coefficients(x_TD)
    y_ETD = module.expert_outputs(x_TD)
    out = torch.einsum("te,etd->td", c_TE, y_ETD)
    shared = module.shared(x_TD)
    if shared is not None:
        out = out + shared
    return out.reshape(x.shape)
