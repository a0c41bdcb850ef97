"""Loops over `nonzero()` in any module are captured as one graph under moeshard (moeshard_compile.static_loops)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

import moeshard_compile
from helpers import assert_close_to_eager
from moeshard_compile.static_loops import static_version


def _route(router, x_TD, top_k):
    weights_TK, ids_TK = router(x_TD).softmax(-1).topk(top_k, -1)
    return ids_TK, weights_TK / weights_TK.sum(-1, keepdim=True)


class HitRowsStacked(nn.Module):
    """transformers' eager experts loop: rows of nonzero(), a padding expert skipped by index."""

    def __init__(self, d_model=8, d_ff=12, num_experts=4, top_k=2):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.router = nn.Linear(d_model, num_experts, bias=False)
        self.gate_up_proj = nn.Parameter(torch.randn(num_experts, 2 * d_ff, d_model) / d_model**0.5)
        self.down_proj = nn.Parameter(torch.randn(num_experts, d_model, d_ff) / d_ff**0.5)

    def forward(self, x_TD):
        ids_TK, weights_TK = _route(self.router, x_TD, self.top_k)
        out = torch.zeros_like(x_TD)
        with torch.no_grad():
            expert_mask = F.one_hot(ids_TK, num_classes=self.num_experts + 1).permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hit:
            expert_idx = expert_idx[0]
            if expert_idx == self.num_experts:
                continue
            slot, token = torch.where(expert_mask[expert_idx])
            gate, up = F.linear(x_TD[token], self.gate_up_proj[expert_idx]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down_proj[expert_idx]) * weights_TK[token, slot, None]
            out.index_add_(0, token, y)
        return out


class HitItemModules(nn.Module):
    """LongCat-style: `int(v.item())`, an empty-selection guard, a ModuleDict by f-string."""

    def __init__(self, d_model=8, d_ff=12, num_experts=4, top_k=2):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.router = nn.Linear(d_model, num_experts, bias=False)
        self.experts = nn.ModuleDict({f"expert_{e}": nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(),
                                                                   nn.Linear(d_ff, d_model)) for e in range(num_experts)})

    def forward(self, x_TD):
        ids_TK, weights_TK = _route(self.router, x_TD, self.top_k)
        out = torch.zeros_like(x_TD)
        expert_mask = F.one_hot(ids_TK, num_classes=self.num_experts).permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero(as_tuple=False)
        for expert_idx_tensor in expert_hit:
            expert_idx = int(expert_idx_tensor.item())
            slot, token = torch.where(expert_mask[expert_idx].squeeze(0))
            if token.numel() == 0:
                continue
            y = self.experts[f"expert_{expert_idx}"](x_TD[token]) * weights_TK[token, slot, None]
            out.index_add_(0, token, y)
        return out


class HitFlatList(nn.Module):
    """A flattened hit list (`.nonzero().view(-1)`) over a ModuleList, boolean-mask dispatch."""

    def __init__(self, d_model=8, d_ff=12, num_experts=4, top_k=1):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(d_model, num_experts, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(d_model, d_ff), nn.ReLU(), nn.Linear(d_ff, d_model))
                                     for _ in range(num_experts))

    def forward(self, x_TD):
        ids_TK, weights_TK = _route(self.router, x_TD, self.top_k)
        chosen_T = ids_TK[:, 0]
        out = torch.zeros_like(x_TD)
        hit = F.one_hot(chosen_T, len(self.experts)).sum(0).nonzero().view(-1)
        for e in hit:
            mask = chosen_T == e
            out[mask] += self.experts[e](x_TD[mask]) * weights_TK[mask]
        return out


class HitToList(HitFlatList):
    """The hit list as Python ints (`.squeeze(-1).tolist()`), as newer transformers loops write it."""

    def forward(self, x_TD):
        ids_TK, weights_TK = _route(self.router, x_TD, self.top_k)
        chosen_T = ids_TK[:, 0]
        out = torch.zeros_like(x_TD)
        hit = F.one_hot(chosen_T, len(self.experts)).sum(0).nonzero()
        for e in hit.squeeze(-1).tolist():
            mask = chosen_T == e
            out[mask] += self.experts[e](x_TD[mask]) * weights_TK[mask]
        return out


class HitPaddingClass(HitRowsStacked):
    """DBRX's loop: a padding class in the one-hot that no token picks, and no check for it: the
    candidate past the weights' end is skipped, as the original loop never reaches it."""

    def forward(self, x_TD):
        ids_TK, weights_TK = _route(self.router, x_TD, self.top_k)
        out = torch.zeros_like(x_TD)
        expert_mask = F.one_hot(ids_TK, num_classes=self.num_experts + 1).permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hit:
            expert_idx = expert_idx[0]
            slot, token = torch.where(expert_mask[expert_idx])
            gate_up = self.gate_up_proj.view(-1, *self.gate_up_proj.shape[1:])[expert_idx]
            gate, up = F.linear(x_TD[token], gate_up).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down_proj[expert_idx]) * weights_TK[token, slot, None]
            out.index_add_(0, token, y)
        return out


LOOPS = [HitRowsStacked, HitItemModules, HitFlatList, HitToList, HitPaddingClass]


@pytest.mark.parametrize("cls", LOOPS)
@pytest.mark.parametrize("routing", ["random", "one hot expert"])
def test_a_nonzero_loop_is_one_graph_and_rewritten(cls, routing):
    torch.manual_seed(0)
    model = cls().eval()
    x = torch.randn(7, 8)
    if routing == "one hot expert":  # every token alike: one expert (set) takes all, the others none
        x = x[:1].expand(7, 8).contiguous()
    report = moeshard_compile.explain(model, x)
    assert [r["status"] for r in report.regions] == ["rewritten"] and report.graph_breaks == []
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():  # without fullgraph, as users write it: the loop's `where` must not break the graph
        compiled = torch.compile(model, backend="moeshard", options={"inductor": False})
        assert_close_to_eager(compiled(x), model(x))
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]


def test_the_hit_list_goes_when_only_the_loop_read_it():
    """A dead `nonzero()` would still break the graph and synchronise the device."""
    assert "nonzero" not in static_version(HitRowsStacked.forward._moeshard_original).__code__.co_names


@pytest.mark.parametrize("cls", LOOPS)
def test_eager_and_other_backends_run_the_original_loop(cls):
    """Only moeshard's traces take the static loop: another backend still meets nonzero()."""
    model = cls().eval()
    assert cls.forward._moeshard_original is not None  # shimmed at class creation
    torch._dynamo.reset()
    not_traceable = (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError, GuardOnDataDependentSymNode)
    with torch.no_grad(), pytest.raises(not_traceable, match="data-dependent|nonzero|Dynamic shape"):
        torch.compile(model, backend="eager", fullgraph=True)(torch.randn(5, 8))


def test_a_function_without_such_a_loop_is_left_alone():
    def plain(x):
        return x.nonzero()

    def loop_over_a_list(xs):
        for x in xs:
            x.nonzero()

    assert static_version(plain) is None and static_version(loop_over_a_list) is None


def test_two_dimensional_hits_keep_nonzero():
    """A hit list of (row, column) pairs is not a list of experts: the loop keeps nonzero's rows."""

    class PairLoop(nn.Module):
        def forward(self, m):
            total = m.new_zeros(())
            hits = m.nonzero()
            for pair in hits:
                total = total + pair.sum()
            return total

    m = torch.tensor([[0, 1], [1, 1]])
    compiled = torch.compile(PairLoop(), backend="moeshard", options={"inductor": False})
    assert PairLoop()(m).item() == compiled(m).item() == 4


def test_a_conditional_index_past_the_end_keeps_its_candidate():
    """An identity expert past the bank (`if e < E: experts[e](x) else: x`, LongCat-Flash's
    zero-compute experts): the original runs it, so the static loop must not skip it."""

    class IdentityPastTheBank(nn.Module):
        def __init__(self, d_model=8, num_experts=3):
            super().__init__()
            self.router = nn.Linear(d_model, num_experts + 1, bias=False)
            self.experts = nn.ModuleList(nn.Linear(d_model, d_model) for _ in range(num_experts))

        def forward(self, x_TD):
            chosen_T = self.router(x_TD).argmax(-1)
            out = torch.zeros_like(x_TD)
            hit = F.one_hot(chosen_T, len(self.experts) + 1).sum(0).nonzero()
            for e in hit.squeeze(-1).tolist():
                mask = chosen_T == e
                if e < len(self.experts):
                    out[mask] = self.experts[e](x_TD[mask])
                else:
                    out[mask] = x_TD[mask]
            return out

    torch.manual_seed(0)
    model = IdentityPastTheBank().eval()
    with torch.no_grad():
        model.router.weight[-1] = model.router.weight[:-1].sum(0)  # many tokens to the identity class
        x = torch.randn(16, 8)
        ref = model(x)
        assert (model.router(x).argmax(-1) == 3).any()
        assert_close_to_eager(torch.compile(model, backend="moeshard", options={"inductor": False})(x), ref)


def _count_loop(x_SD, counts_E, experts):
    outputs, start = [], 0
    for e, count in enumerate(counts_E.tolist()):
        if count == 0:
            continue
        outputs.append(experts[e](x_SD[start:start + count]))
        start += count
    return torch.cat(outputs)


def _bincount_loop(x_SD, ids_S, experts):
    outputs, start = [], 0
    for e, count in enumerate(torch.bincount(ids_S, minlength=len(experts)).tolist()):
        outputs.append(experts[e](x_SD[start:start + count]))
        start += count
    return torch.cat(outputs)


def _expert_sizes(gates_TE):
    expert_size = gates_TE.long().sum(0)
    return expert_size.tolist()


def _lengths(mask_BS):
    return mask_BS.sum(-1).tolist()


def test_only_a_router_handing_on_its_expert_counts_keeps_the_list():
    """A router's `expert_size.tolist()` stays in the graph (the experts split by it); bincount's
    length is data-dependent (Dynamo cannot list it); slicing rows by running sums of counts
    leaves Inductor unable to prove the slices cover the rows; a list that is not about experts
    (sequence lengths) is none of moeshard's business: those stay graph breaks."""
    assert static_version(_expert_sizes) is not None
    assert static_version(_bincount_loop) is None and static_version(_count_loop) is None
    assert static_version(_lengths) is None
