"""`torch.ops.moeshard_bench.grouped_mm` against a float64 per-group loop, and torch.library.opcheck."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import bench.baselines.grouped_mm  # noqa: F401  (registers torch.ops.moeshard_bench.grouped_mm)

grouped_mm = torch.ops.moeshard_bench.grouped_mm.default


def reference(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows offs[e-1]:offs[e] of x times w[e], in float64; rows past offs[-1] stay zero."""
    y = torch.zeros(x.shape[0], w.shape[2], dtype=torch.float64)
    start = 0
    for e, end in enumerate(offs.tolist()):
        for row in range(start, end):
            y[row] = x[row].double() @ w[e].double()
        start = end
    return y


def inputs(counts, D=5, F=3, dtype=torch.float32, offs_dtype=torch.int64, seed=0):
    g = torch.Generator().manual_seed(seed)
    E, S = len(counts), sum(counts)
    x = torch.randn(S, D, generator=g, dtype=dtype)
    w = torch.randn(E, D, F, generator=g, dtype=dtype)
    offs = torch.tensor(counts, dtype=torch.int64).cumsum(0).to(offs_dtype)
    return x, w, offs


def check(x, w, offs):
    y = grouped_mm(x, w, offs)
    assert y.shape == (x.shape[0], w.shape[2]) and y.dtype == x.dtype
    ref = reference(x, w, offs)
    tol = 1e-12 if x.dtype == torch.float64 else 1e-5
    torch.testing.assert_close(y.double(), ref, atol=tol, rtol=tol)
    return y


COUNTS = {
    "mixed": [3, 1, 4, 2],
    "empty_groups": [0, 3, 0, 0, 4, 0],
    "all_rows_in_first": [7, 0, 0, 0],
    "all_rows_in_last": [0, 0, 0, 7],
    "all_rows_in_middle": [0, 7, 0],
    "single_expert": [5],
    "zero_rows": [0, 0, 0, 0],
    "one_row_each": [1, 1, 1, 1],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(COUNTS))
def test_matches_per_group_loop(case, dtype):
    check(*inputs(COUNTS[case], dtype=dtype))


def test_zero_rows_gives_empty_output():
    x, w, offs = inputs([0, 0, 0])
    y = grouped_mm(x, w, offs)
    assert y.shape == (0, w.shape[2])


def test_int32_offsets():
    check(*inputs([2, 0, 5], offs_dtype=torch.int32))


def test_non_contiguous_weights():
    """recognise_stacked feeds transposed views of the user's [E, out, in] weights."""
    x, w, offs = inputs([2, 0, 4, 1])
    w_view = w.transpose(1, 2).contiguous().transpose(1, 2)
    assert not w_view.is_contiguous()
    check(x, w_view, offs)


def test_non_contiguous_rows():
    x, w, offs = inputs([3, 2, 1], D=6)
    x_view = torch.randn(x.shape[1], x.shape[0]).t()  # [S, D], column-major
    assert not x_view.is_contiguous()
    check(x_view, w, offs)


@given(
    counts=st.lists(st.integers(min_value=0, max_value=6), min_size=1, max_size=6),
    D=st.integers(min_value=1, max_value=6),
    F=st.integers(min_value=1, max_value=6),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_random_groups(counts, D, F, seed):
    check(*inputs(counts, D=D, F=F, seed=seed))


@pytest.mark.parametrize("case", ["mixed", "empty_groups", "all_rows_in_last", "zero_rows"])
def test_opcheck(case):
    # The default test_utils (test_schema, test_autograd_registration, test_faketensor,
    # test_aot_dispatch_dynamic) all apply on CPU, so none is left out. Inputs do not require
    # grad: the op is inference-only (moeshard rewrites only no-grad graphs) and registers no
    # autograd formula, so a backward through it is out of scope.
    x, w, offs = inputs(COUNTS[case])
    result = torch.library.opcheck(grouped_mm, (x, w, offs))
    assert result == {name: "SUCCESS" for name in result}, result
    assert set(result) >= {"test_schema", "test_faketensor", "test_aot_dispatch_dynamic"}


def test_fake_impl_rejects_mismatched_inner_dim():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(4, 5)
        w = torch.empty(2, 6, 3)
        offs = torch.tensor([1, 4])
        with pytest.raises(Exception, match="disagree on D"):
            grouped_mm(x, w, offs)
