"""Through Inductor: the output code calls the grouped op; new shapes and routings don't recompile."""

import torch
from torch._inductor.utils import run_and_get_code

import hf_tiny
from helpers import assert_close_to_eager
from moeshard_compile import moeshard_backend


class CountingBackend:
    """moeshard, counting how often Dynamo asks for a compilation."""

    _moeshard = True  # the capture shims trace HF's loops for moeshard only

    def __init__(self, **options):
        self.options, self.compilations = options, 0

    def __call__(self, gm, example_inputs):
        self.compilations += 1
        return moeshard_backend(gm, example_inputs, options=self.options)


def test_switch_through_inductor_new_shapes_recompile_at_most_once():
    torch.manual_seed(0)
    model = hf_tiny.switch(expert_capacity=3).eval()
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    shapes = [(2, 6), (3, 7), (4, 5), (2, 11), (3, 7)]
    with torch.no_grad():
        _, (code,) = run_and_get_code(compiled, **hf_tiny.inputs(model, *shapes[0]))
        # on CPU the triton_ops run their reference ops (on CUDA: the Triton kernels, tests/test_kernels_gpu.py)
        assert "moeshard.gather_grouped_ffn_in" in code and "moeshard.grouped_ffn_out_scatter" in code
        for i, (batch, seq) in enumerate(shapes):
            kwargs = hf_tiny.inputs(model, batch, seq, seed=i)  # fresh tokens: different routing each call
            assert_close_to_eager(compiled(**kwargs)[0], model(**kwargs)[0])
    # first call static, the second shape makes Dynamo go dynamic once; nothing after that,
    # and the data-dependent tokens-per-expert never guard a graph
    assert backend.compilations == 2


def test_mixtral_through_inductor():
    torch.manual_seed(0)
    model = hf_tiny.mixtral("grouped_mm").eval()
    kwargs = hf_tiny.inputs(model, 3, 5)
    with torch.no_grad():
        out = torch.compile(model, backend="moeshard", fullgraph=True)(**kwargs)[0]
        assert_close_to_eager(out, model(**kwargs)[0])
