"""The expert kernel each region runs: the grouped_mm path equals the fused ops, the choice
follows the option and the measurements, and measurements are cached per shape class.

Timing itself is meaningful on a GPU only (bench/expert_kernels.py); here the measurements
are stood in for where the logic, not the clock, is under test."""

import json

import pytest
import torch

import hf_tiny
from graph_capture import capture
from moeshard_compile import kernel_choice
from moeshard_compile.kernel_choice import choose_kernels
from moeshard_compile.passes.grouped_mm_experts import grouped_mm_ffn_in, grouped_mm_ffn_out
from moeshard_compile.report import Report
from moeshard_compile.backend import make_backend
from moeshard_compile.options import Options


@pytest.fixture(autouse=True)
def own_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MOESHARD_CACHE_DIR", str(tmp_path / "cache"))


def _groups(counts_E: list[int], K: int, seed: int):
    """Rows grouped by expert for the given counts (T * K rows in all), as group_by_expert gives them."""
    generator = torch.Generator().manual_seed(seed)
    ids_S = torch.tensor([e for e, c in enumerate(counts_E) for _ in range(c)], dtype=torch.long)[torch.randperm(sum(counts_E), generator=generator)]
    weight_S = torch.rand(ids_S.shape, generator=generator)
    weight_S[::5] = 0  # dropped slots
    return torch.ops.moeshard.group_by_expert(ids_S, weight_S, len(counts_E), K), ids_S


@pytest.mark.parametrize("counts_E", [[3, 0, 5, 4], [12, 0, 0, 0], [0, 0, 0, 0], [1, 2, 3, 6]],
                         ids=["mixed", "one_hot", "empty", "skewed"])
@pytest.mark.parametrize("gated, biased", [(True, False), (False, True), (True, True)])
def test_grouped_mm_path_equals_the_fused_ops(counts_E, gated, biased):
    """Same values as the fused ops' reference, in bf16 (grouped_mm's only dtype), with a
    zero routing weight giving exactly 0 even where the expert's output is inf."""
    seed = int(torch.randint(1000, ()))
    K, D, F, E = 2, 16, 24, len(counts_E)
    (order_S, token_S, weight_sorted_S, _, offs_E), ids_S = _groups(counts_E, K, seed)
    T = (sum(counts_E) + K - 1) // K
    g = torch.Generator().manual_seed(seed)
    bf16 = dict(dtype=torch.bfloat16)
    x_TD = torch.randn(max(T, 1), D, generator=g).to(**bf16)
    w_in, w_out = torch.randn(E, D, F, generator=g).to(**bf16), torch.randn(E, F, D, generator=g).to(**bf16)
    w_gate = torch.randn(E, D, F, generator=g).to(**bf16) if gated else None
    b_in, b_gate, b_out = (torch.randn(E, n, generator=g).to(**bf16) if biased else None for n in (F, F, D))
    if b_gate is not None and not gated:
        b_gate = None
    if biased and sum(counts_E):
        b_out[ids_S[order_S][0]] = float("inf")  # some row's expert output is inf
    expert_S = ids_S[order_S]
    ffn_in = (w_in, w_gate, b_in, b_gate, "silu")
    rows_S = token_S.clamp(max=x_TD.shape[0] - 1)
    want_h = torch.ops.moeshard.gather_grouped_ffn_in(x_TD, rows_S, offs_E, *ffn_in)
    got_h = grouped_mm_ffn_in(x_TD, rows_S, offs_E, expert_S, *ffn_in)
    torch.testing.assert_close(got_h, want_h, rtol=2e-2, atol=2e-2)
    want_y = torch.ops.moeshard.grouped_ffn_out_scatter(want_h, offs_E, w_out, b_out, order_S, weight_sorted_S)
    got_y = grouped_mm_ffn_out(want_h, offs_E, expert_S, w_out, b_out, order_S, weight_sorted_S)
    torch.testing.assert_close(got_y, want_y, rtol=2e-2, atol=5e-2)
    dropped_S = order_S[weight_sorted_S == 0]
    assert (got_y[dropped_S] == 0).all()


def _qwen3_regions(dtype=torch.bfloat16):
    model = hf_tiny.qwen3_moe().eval().to(dtype)
    captured = capture(model, **hf_tiny.inputs(model))
    return captured.regions, captured.inputs()


@pytest.mark.parametrize("option, dtype, one_rank, kernel, text", [
    ("fused", torch.bfloat16, True, "fused", "fused (forced)"),
    ("grouped_mm", torch.bfloat16, True, "grouped_mm", "grouped_mm (forced)"),
    ("grouped_mm", torch.float32, True, "fused", "fused (grouped_mm: bf16 only)"),
    ("grouped_mm", torch.bfloat16, False, "fused", "fused (grouped_mm: one rank only)"),
    ("auto", torch.bfloat16, True, "fused", "fused (grouped_mm: timed on CUDA only)"),
    ("auto", torch.float32, True, "fused", "fused (grouped_mm: bf16 only)"),
])
def test_choice_follows_the_option_and_says_why(option, dtype, one_rank, kernel, text):
    regions, values = _qwen3_regions(dtype)
    choices = choose_kernels(regions, values, one_rank, option)
    assert len(choices) == len(regions) == 2
    assert {(c.kernel, c.text()) for c in choices.values()} == {(kernel, text)}


def test_auto_takes_the_faster_once_per_shape_class_and_caches_it(monkeypatch):
    regions, values = _qwen3_regions()
    monkeypatch.setattr(kernel_choice, "_grouped_mm_impossible", lambda *args, **kwargs: "")
    monkeypatch.setattr(kernel_choice, "torch", _NamedDevice(torch))
    measured = []

    def measure(weights, num_experts, top_k, rows, activation):
        measured.append(rows)
        return {"fused": 2.0, "grouped_mm": 1.5}, ""

    monkeypatch.setattr(kernel_choice, "time_kernels", measure)
    first = choose_kernels(regions, values, True, "auto")
    # both layers have one shape class: measured for the first, read back for the second
    rows = 2 * 6 * regions[0].top_k  # hf_tiny.inputs: 2 sequences of 6 tokens
    assert [c.how for c in first.values()] == ["measured", "cached"] and measured == [rows]
    assert {c.kernel for c in first.values()} == {"grouped_mm"}
    assert first[regions[0]].text() == "grouped_mm (measured: grouped_mm 1.5 ms, fused 2 ms)"
    entries = json.loads(kernel_choice.cache_path().read_text())
    (key, entry), = entries.items()
    assert entry == {"kernel": "grouped_mm", "times_ms": {"fused": 2.0, "grouped_mm": 1.5}}
    assert json.loads(key)["rows"] == 1 << (rows - 1).bit_length() >= rows and json.loads(key)["E"] == 8

    entries[key]["kernel"] = "fused"  # a later compile reads what the file says, measuring nothing
    kernel_choice.cache_path().write_text(json.dumps(entries))
    again = choose_kernels(regions, values, True, "auto")
    assert [c.how for c in again.values()] == ["cached", "cached"] and len(measured) == 1
    assert {c.kernel for c in again.values()} == {"fused"}


def test_a_failing_grouped_mm_keeps_the_fused_kernels(monkeypatch):
    regions, values = _qwen3_regions()
    monkeypatch.setattr(kernel_choice, "_grouped_mm_impossible", lambda *args, **kwargs: "")
    monkeypatch.setattr(kernel_choice, "torch", _NamedDevice(torch))
    monkeypatch.setattr(kernel_choice, "time_kernels", lambda *args: ({}, "grouped_mm failed: bad strides"))
    choices = choose_kernels(regions, values, True, "auto")
    assert {c.text() for c in choices.values()} == {"fused (grouped_mm failed: bad strides)"}
    assert not kernel_choice.cache_path().exists()


def test_measure_times_both_paths_on_the_regions_shapes():
    """On CPU the clock is the host's; what matters is that both paths run on the region's weights."""
    regions, values = _qwen3_regions()
    region = regions[0]
    weights = region.weights.stack([values[n] for n in region.weights.inputs])
    times_ms, failed = kernel_choice.time_kernels(weights, region.num_experts, region.top_k, 24, region.activation)
    assert failed == "" and set(times_ms) == {"fused", "grouped_mm"} and min(times_ms.values()) > 0


def test_forced_grouped_mm_through_inductor_equals_eager_and_is_reported():
    torch._dynamo.reset()
    model = hf_tiny.qwen3_moe().eval().to(torch.bfloat16)
    inputs = hf_tiny.inputs(model, seed=int(torch.randint(1000, ())))
    report = Report()
    with torch.no_grad():
        expected = model(**inputs).last_hidden_state
        got = torch.compile(model, backend=make_backend(Options(expert_kernel="grouped_mm"), report))(**inputs)
    torch.testing.assert_close(got.last_hidden_state, expected, rtol=3e-2, atol=3e-2)
    assert [row["kernel"] for row in report.regions] == ["grouped_mm (forced)"] * 2
    assert "grouped_mm (forced)" in report.table()
    assert report.to_dict()["regions"][0]["kernel_choice"]["kernel"] == "grouped_mm"
    code = report.rewritten_graphs[0].code
    assert code.count("grouped_mm_ffn_in") == 2 and "gather_grouped_ffn_in" not in code


class _NamedDevice:
    """torch, with a device name for the cache key where no GPU is."""

    def __init__(self, real):
        self._real = real
        self.cuda = type("cuda", (), {"get_device_name": staticmethod(lambda device=None: "test GPU")})

    def __getattr__(self, name):
        return getattr(self._real, name)


def test_timing_that_raises_keeps_the_fused_kernels_and_says_why(monkeypatch):
    regions, values = _qwen3_regions()
    monkeypatch.setattr(kernel_choice, "_grouped_mm_impossible", lambda *args, **kwargs: "")
    monkeypatch.setattr(kernel_choice, "torch", _NamedDevice(torch))

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(kernel_choice, "time_kernels", out_of_memory)
    choices = choose_kernels(regions, values, True, "auto")
    assert {c.text() for c in choices.values()} == {"fused (timing failed: OutOfMemoryError: CUDA out of memory. "
                                                    "Tried to allocate 2.00 GiB)"}
