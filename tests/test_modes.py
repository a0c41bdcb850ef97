"""torch.compile's mode= and Inductor's own options reach Inductor through moeshard, and CUDA
graphs may keep the parameters and stacked expert weights in place (AOT reads them as static).

On CPU Inductor runs without CUDA graphs in every mode; what is checked here is what Inductor
is handed, and that the compiled model still equals eager."""

import pytest
import torch
from torch._functorch._aot_autograd.frontend_utils import _try_get_metadata_from_dynamo
from torch._inductor import compile_fx as compile_fx_module, config as inductor_config

import moeshard_compile
from moeshard_compile import OptionError, Options
from moeshard_compile.options import inductor_patches
import hf_tiny


@pytest.fixture
def handed(monkeypatch):
    """What each graph was compiled under, as the first compile_fx call for it was handed:
    (graph, example inputs, Inductor config with the call's patches applied)."""
    calls = []
    real = compile_fx_module.compile_fx

    def recording(gm, example_inputs, *args, config_patches=None, **kwargs):
        if not any(gm is seen for seen, _, _ in calls):  # compile_fx calls itself once patched
            calls.append((gm, list(example_inputs), {**inductor_config.get_config_copy(), **(config_patches or {})}))
        return real(gm, example_inputs, *args, config_patches=config_patches, **kwargs)

    monkeypatch.setattr(compile_fx_module, "compile_fx", recording)
    return calls


def _qwen3(**compile_kwargs):
    torch._dynamo.reset()
    model = hf_tiny.qwen3_moe().eval()
    inputs = hf_tiny.inputs(model, seed=torch.randint(1000, ()).item())
    with torch.no_grad():
        expected = model(**inputs).last_hidden_state
        got = torch.compile(model, backend="moeshard", **compile_kwargs)(**inputs).last_hidden_state
    return expected, got


@pytest.mark.parametrize("given", [dict(mode="max-autotune-no-cudagraphs"),
                                   dict(options={"mode": "max-autotune-no-cudagraphs"})])
def test_mode_reaches_inductor_from_torch_compile_and_from_options(handed, given):
    expected, got = _qwen3(**given)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert handed and all(patches.get("max_autotune") and patches.get("coordinate_descent_tuning")
                          for _, _, patches in handed)


def test_reduce_overhead_runs_on_cpu_and_marks_the_weights_static(handed):
    """Under CUDA graphs, inputs AOT does not know to be static are copied at every replay:
    for the stacked expert weights that would be a pass over all of them per call."""
    expected, got = _qwen3(options={"mode": "reduce-overhead"})
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    (gm, example_inputs, patches), = handed
    assert patches["triton.cudagraphs"] is True
    placeholders = gm.graph.find_nodes(op="placeholder")
    weights = [i for i, n in enumerate(placeholders) if n.name.startswith("moe")]
    params = [i for i, n in enumerate(placeholders) if "parameters" in n.name]
    assert len(weights) == 2 * 3 and params  # two layers of w_gate, w_in, w_out
    _, static = _try_get_metadata_from_dynamo(gm, {}.keys(), len(placeholders), [])
    assert set(weights) | set(params) <= set(static)
    assert not set(static) & {i for i, n in enumerate(placeholders) if "input_ids" in n.name}


def test_inductor_config_overrides_the_modes_entries(handed):
    _qwen3(options={"mode": "max-autotune-no-cudagraphs", "inductor_config": {"coordinate_descent_tuning": False}})
    assert all(patches["max_autotune"] and patches["coordinate_descent_tuning"] is False for _, _, patches in handed)


def test_weight_check_defaults_to_version_under_cuda_graphs_only():
    assert Options().weight_check == "fingerprint"
    assert Options(mode="max-autotune-no-cudagraphs").weight_check == "fingerprint"
    assert Options(mode="reduce-overhead").weight_check == "version"
    assert Options(inductor_config={"triton.cudagraphs": True}).weight_check == "version"
    assert Options(mode="reduce-overhead", weight_check="fingerprint").weight_check == "fingerprint"


def test_per_call_rank_check_defaults_off_under_cuda_graphs_only():
    """The per-call check all-gathers and reads a row on the host: a sync a CUDA graph must not pay."""
    assert Options().check_inputs is True
    assert Options(mode="max-autotune-no-cudagraphs").check_inputs is True
    assert Options(mode="reduce-overhead").check_inputs is False
    assert Options(inductor_config={"triton.cudagraphs": True}).check_inputs is False
    assert Options(mode="reduce-overhead", check_inputs=True).check_inputs is True


def test_default_mode_is_no_patches():
    assert Options(mode="default").mode is None and inductor_patches(Options(mode="default")) == {}


@pytest.mark.parametrize("options, named", [
    ({"mode": "fast"}, "'mode'"),
    ({"mode": "reduce-overhead", "inductor": False}, "inductor=True"),
    ({"inductor_config": {"no_such_entry": 1}}, "no_such_entry"),
    ({"inductor_config": ["max_autotune"]}, "'inductor_config'"),
    ({"expert_kernel": "cutlass"}, "'expert_kernel'"),
])
def test_bad_inductor_options_name_the_problem(options, named):
    with pytest.raises(OptionError, match=named):
        Options.from_user(options)


def test_bad_mode_through_torch_compile_lists_the_modes():
    model = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError) as info, torch.no_grad():
        torch.compile(model, backend="moeshard", mode="fastest")(torch.randn(2, 4))
    assert "reduce-overhead" in str(info.value) and "max-autotune" in str(info.value)


def test_package_exports_options_with_the_new_fields():
    assert {"mode", "inductor_config", "expert_kernel"} <= set(Options.__dataclass_fields__)
    assert moeshard_compile.Options is Options
