"""Never silent: what looks like an MoE layer and is not rewritten is a report row and a warning."""

import warnings

import pytest
import torch
import torch.nn as nn

import hf_tiny
import moeshard_compile
from helpers import assert_close_to_eager


class MaxOfExperts(nn.Module):
    """Routed experts combined by an elementwise max: not linear in the experts, never an MoE region."""

    def __init__(self, d_model=8, d_ff=16, num_experts=4, top_k=2):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(d_model, num_experts, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(d_model, d_ff), nn.ReLU(), nn.Linear(d_ff, d_model))
                                     for _ in range(num_experts))

    def forward(self, x_TD):
        weights_TK, ids_TK = self.router(x_TD).softmax(-1).topk(self.top_k, -1)
        gate_TE = torch.zeros(x_TD.shape[0], len(self.experts)).scatter(-1, ids_TK, weights_TK)
        y_ETD = torch.stack([gate_TE[:, e, None] * expert(x_TD) for e, expert in enumerate(self.experts)])
        return y_ETD.amax(0)


class Classifier(nn.Module):
    """An argmax that is a prediction, not a routing decision."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 4)

    def forward(self, x_TD):
        return self.head(x_TD).argmax(-1)


def _explain(model, *args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = moeshard_compile.explain(model.eval(), *args, **kwargs)
    return report, [str(w.message) for w in caught if str(w.message).startswith("moeshard:")]


def test_an_unrecognised_expert_bank_is_reported_and_warned():
    model, x = MaxOfExperts(), torch.randn(6, 8)
    report, messages = _explain(model, x)
    (row,) = report.regions
    assert (row["module"], row["form"], row["num_experts"], row["status"]) == ("experts", "expert_bank", 4, "skipped")
    assert row["reason"] == "a routing decision and an expert bank whose dispatch and combine were not recognised"
    (message,) = messages
    assert message.startswith("moeshard: graph 0: 1 MoE structure(s) not rewritten (experts: a routing decision")
    assert "experts" in report.table() and "skipped" in report.table()
    with torch.no_grad():
        assert_close_to_eager(torch.compile(model, backend="moeshard", options={"inductor": False})(x), model(x))


def test_an_unrecognised_layer_before_a_rewritten_one_is_reported():
    """A rewritten region's router reads its layer's input, which comes from the layer before:
    that layer is upstream, not part of the region, and still gets its row."""
    import spellings

    model = nn.Sequential(MaxOfExperts(d_model=16), spellings.make("mixtral", d_model=16)).eval()
    report, _ = _explain(model, torch.randn(6, 16))
    rows = sorted((row["module"], row["status"]) for row in report.regions)
    assert rows == [("0.experts", "skipped"), ("1.experts", "rewritten")], report.regions


def test_a_routing_decision_without_a_bank_is_reported():
    class TopKGather(nn.Module):
        def __init__(self):
            super().__init__()
            self.router = nn.Linear(8, 4)
            self.table = nn.Parameter(torch.randn(4, 8))

        def forward(self, x_TD):
            ids_T = self.router(x_TD).argmax(-1)
            return x_TD + self.table[ids_T]

    report, messages = _explain(TopKGather(), torch.randn(5, 8))
    (row,) = report.regions
    assert (row["form"], row["status"]) == ("routing", "skipped")
    assert row["reason"] == "a routing decision (argmax) whose per-expert work was not recognised"
    assert len(messages) == 1


def test_a_prediction_argmax_is_not_reported():
    report, messages = _explain(Classifier(), torch.randn(5, 8))
    assert report.regions == [] and messages == []


@pytest.mark.parametrize("use", ["values", "indices"])
def test_a_max_counts_as_a_routing_decision_only_when_its_indices_select(use):
    """A max whose values scale the output chooses nothing; one whose indices gather rows does."""

    class ScaleOrGather(nn.Module):
        def __init__(self):
            super().__init__()
            self.router = nn.Linear(8, 4)
            self.table = nn.Parameter(torch.randn(4, 8))

        def forward(self, x_TD):
            best = self.router(x_TD).softmax(-1).max(dim=-1)
            return x_TD * best.values[:, None] if use == "values" else x_TD + self.table[best.indices]

    report, messages = _explain(ScaleOrGather(), torch.randn(5, 8))
    want = [] if use == "values" else [("routing", "skipped")]
    assert [(r["form"], r["status"]) for r in report.regions] == want and len(messages) == len(want)


@pytest.mark.parametrize("build", [hf_tiny.switch, hf_tiny.qwen2_moe, hf_tiny.bert])
def test_rewritten_and_dense_models_have_no_extra_rows(build):
    model = build()
    report, messages = _explain(model, **hf_tiny.inputs(model))
    assert all(r["status"] == "rewritten" for r in report.regions) and messages == []
