"""The `moeshard` Dynamo backend: recognise MoE regions, rewrite them, hand over to Inductor.

    Dynamo FX graph -> passes.recognise, prepare, verify, rewrite -> stacked weights -> Inductor (compile_fx)

Graphs without MoE regions go to Inductor unchanged. Everything the backend did is recorded
in a Report (and, with `dump_dir`, written next to each graph's code before/after).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from moeshard_compile import passes
from moeshard_compile.passes.graph_utils import dropout_args, module_paths, param_name
from moeshard_compile.passes.unrecognised import find_unrecognised
from moeshard_compile import distributed
from moeshard_compile.kernel_choice import choose_kernels
from moeshard_compile.placement import choose_placements
from moeshard_compile.options import OptionError, Options, inductor_patches
from moeshard_compile.report import Report, region_row, unrecognised_row
from moeshard_compile.weights import ReleasedError, WeightFeed

log = logging.getLogger(__name__)

# One report per dump directory, accumulated over the graphs of a compiled model.
_REPORTS: dict[str, Report] = {}


def moeshard_backend(gm: fx.GraphModule, example_inputs: list, options: Any = None, mode: str | None = None):
    """Entry point Dynamo calls (registered as "moeshard" through torch_dynamo_backends).

    torch.compile passes either `mode` or `options`, never both: the mode may also come as
    options["mode"]."""
    opts = Options.from_user(options)
    if mode is not None:
        opts = replace(opts, mode=mode, weight_check=None)
    report = _REPORTS.setdefault(opts.dump_dir, Report()) if opts.dump_dir else Report()
    return compile_graph(gm, example_inputs, opts, report)


moeshard_backend._moeshard = True  # lets the capture shims recognise moeshard at trace time


def make_backend(opts: Options, report: Report) -> Callable:
    """A moeshard backend that records into `report`: for explain, and for a compiled model whose
    report or rewritten graphs (`report.rewritten_graphs`) you want to read."""

    def backend(gm: fx.GraphModule, example_inputs: list) -> Callable:
        return compile_graph(gm, example_inputs, opts, report)

    backend._moeshard = True
    return backend


def compile_graph(gm: fx.GraphModule, example_inputs: list, opts: Options, report: Report) -> Callable:
    graph_id = report.graphs
    report.graphs += 1
    if opts.dump_dir:
        _dump(opts.dump_dir, f"graph_{graph_id}_before.py", gm)

    original = gm
    gm = _own_copy(gm)  # Dynamo keeps using its graph after we return: rewrite a copy
    plan, group = distributed.resolve(opts)
    try:
        regions = passes.recognise(gm)
        passes.prepare(gm, regions)
    except Exception as error:  # a graph no recogniser can read must still run, unchanged
        reason = _first_line("recognition failed", error)
        log.warning("moeshard: graph %d compiled unchanged, %s", graph_id, reason)
        report.fallbacks.append({"graph": graph_id, "reason": reason})
        gm, regions = _own_copy(original), []
    fallback = _fallback_reason(gm, example_inputs)
    if fallback:
        report.fallbacks.append({"graph": graph_id, "reason": fallback})
        for region in regions:
            if region.status is passes.Status.RECOGNISED:
                region.skip(fallback)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    started = time.perf_counter()
    passes.verify(gm, regions, dict(zip(placeholders, _verification_values(example_inputs))))
    report.verify_seconds += time.perf_counter() - started
    unrecognised = find_unrecognised(gm, regions)
    if plan is not None:
        distributed.check_fits(regions, plan)
    attempted = [r for r in regions if r.status is passes.Status.RECOGNISED]
    choices, placements, plans = {}, {}, {}
    try:
        values = dict(zip(placeholders, example_inputs))
        choices = choose_kernels(regions, values, plan is None, opts.expert_kernel)
        placements = choose_placements(regions, values, plan, opts.expert_group_size, group,
                                       cuda_graphs=inductor_patches(opts).get("triton.cudagraphs", False))
        plans = {r: replace(plan, group_size=p.group_size) for r, p in placements.items()}
        sources = passes.rewrite(gm, regions, dropless=opts.dropless, plan=plan,
                                 kernels={r: c.kernel for r, c in choices.items()}, plans=plans)
        _mark_weights_static(gm, len(example_inputs))
        feed = WeightFeed(gm, example_inputs, sources, with_digest=plan is not None,
                          fingerprint=opts.weight_check == "fingerprint")
        early_comm = plan is not None and plan.input_mode == "data_parallel" and (plan.comm_chunks > 1
                                                                                  or plan.overlap != "none")
        compiled = _lower(gm, example_inputs, feed.tensors(), opts, keep_comm_order=early_comm and bool(attempted))
    except Exception as error:  # keep the model working: compile the original graph, say why
        if not attempted:
            raise  # nothing of ours was involved: a genuine compile error
        reason = _first_line("rewrite failed", error)
        log.warning("moeshard: graph %d compiled unchanged, %s", graph_id, reason)
        for region in attempted:
            region.skip(reason)
        report.fallbacks.append({"graph": graph_id, "reason": reason})
        gm, feed = original, WeightFeed(original, example_inputs)
        compiled = _lower(original, example_inputs, [], opts)
    _refuse_released(gm, example_inputs)
    report.rewritten_graphs.append(gm)
    if opts.release_unsharded and plan is not None:
        feed.release_unsharded()
    rewritten = [r for r in regions if r.status is passes.Status.REWRITTEN]
    held = dict(zip(rewritten, feed.held()))
    for region in regions:
        log.info("moeshard: %s %s (%s) %s", region.module, region.status.value, region.form, region.reason)
    rows = [region_row(graph_id, r, plans.get(r, plan), held.get(r), opts.dropless, choices.get(r), placements.get(r))
            for r in regions]
    rows += [unrecognised_row(graph_id, u) for u in unrecognised]
    report.regions += rows
    _warn_skipped(graph_id, [row for row in rows if row["status"] != "rewritten"])
    report.note_graph_breaks()
    if opts.dump_dir:
        _dump(opts.dump_dir, f"graph_{graph_id}_after.py", gm)
        report.write(opts.dump_dir)
    if group is None or not regions:
        return feed.bind(compiled)
    # every rank that found MoE regions takes part in the check, also one that runs them unsharded
    check = distributed.RankCheck(group, opts, rewritten, skipped=len(regions) - len(rewritten))
    if not rewritten:
        return _checked(compiled, check)
    inner = feed.bind(compiled, check)
    return lambda *args: distributed.guarded(lambda: inner(*args), group, "a collective of the sharded MoE graph")


def _verification_values(example_inputs: list) -> list:
    """The graph's inputs for passes.verify: parameters release_unsharded freed are random
    stand-ins of their shape (the verifier checks structure; any weights of the shape do)."""
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(v.shape, generator=generator, dtype=v.dtype).to(v.device)
            if getattr(v, "_moeshard_released", False) else v for v in example_inputs]


def _warn_skipped(graph_id: int, rows: list[dict]) -> None:
    """One warning per compiled graph that leaves MoE-looking structures as they are."""
    if rows:
        listed = "; ".join(f"{row['module'] or '(top level)'}: {row['reason']}" for row in rows)
        warnings.warn(f"moeshard: graph {graph_id}: {len(rows)} MoE structure(s) not rewritten ({listed}); "
                      "see the report (moeshard_compile.explain or options dump_dir)", stacklevel=2)


def _refuse_released(gm: fx.GraphModule, example_inputs: list) -> None:
    """A graph that still reads parameters release_unsharded=True freed would compute with NaN."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs):
        if getattr(value, "_moeshard_released", False) and node.users:
            raise ReleasedError(
                f"moeshard: this graph reads {param_name(node) or node.name}, which release_unsharded=True "
                "released, but its MoE region was not rewritten (see the report): build and compile a fresh model"
            )


def _first_line(what: str, error: Exception) -> str:
    return f"{what}: {type(error).__name__}: {error}".splitlines()[0]


def _checked(compiled: Callable, check: Callable[[tuple], None]) -> Callable:
    def run(*args):
        check(args)
        return compiled(*args)

    return run


def _lower(gm: fx.GraphModule, example_inputs: list, weights: list[torch.Tensor], opts: Options,
           keep_comm_order: bool = False) -> Callable:
    """Inductor (or the FX graph as is) over the graph's inputs followed by the stacked weights.

    keep_comm_order: the graph issues its collectives early on purpose (comm_chunks, overlap). Inductor's
    peak-memory reordering would move every collective next to its wait, serialising them with
    the computation, so it is off for such graphs (they hold C chunks of rows at once instead)."""
    if not opts.inductor:
        return gm.forward
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx

    keep = inductor_config.patch(reorder_for_peak_memory=False) if keep_comm_order else contextlib.nullcontext()
    with keep:
        return compile_fx(gm, list(example_inputs) + _static_fakes(example_inputs, weights),
                          config_patches=inductor_patches(opts))


def _static_fakes(example_inputs: list, tensors: list[torch.Tensor]) -> list:
    """Our extra inputs as fake tensors of Dynamo's fake mode with static shapes.

    Given real tensors, AOT would give their sizes fresh symbols that no Dynamo source backs;
    a guard Inductor puts on such a symbol breaks guard building (seen with torch 2.11)."""
    from torch._guards import detect_fake_mode

    fake_mode = detect_fake_mode(example_inputs)
    if fake_mode is None:
        return tensors
    return [fake_mode.from_tensor(t, static_shapes=True) for t in tensors]


def _own_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy that still reads as Dynamo's graph to AOT (its meta, parameter sources and each
    input's source): AOT takes from them which inputs CUDA graphs may keep in place."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    output = graph.graph_copy(gm.graph, env)
    graph.output(output)
    copy = fx.GraphModule(gm, graph)
    copy.meta.update(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        copy._param_name_to_source = gm._param_name_to_source
    for node, copied in env.items():
        if hasattr(node, "_dynamo_source"):
            copied._dynamo_source = node._dynamo_source
    return copy


def _mark_weights_static(gm: fx.GraphModule, graph_inputs: int) -> None:
    """The stacked weights (the inputs after the graph's own) keep their storage from call to
    call, as parameters do: mark them so, as Dynamo marks parameters, so that CUDA graphs read
    them in place instead of copying them into the graph's buffers at every replay."""
    for node in gm.graph.find_nodes(op="placeholder")[graph_inputs:]:
        node._dynamo_source = None
        node.meta["tensor_dict"] = {"_dynamo_static_input_type": "unguarded"}


def _fallback_reason(gm: fx.GraphModule, example_inputs: list) -> str | None:
    """Why a graph must be compiled unchanged, or None. Never rewrite what we cannot keep exact."""
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs):
        return (
            "autograd is on and inputs/parameters require grad: moeshard rewrites inference graphs only "
            "(call the model under torch.no_grad() or torch.inference_mode())"
        )
    for node in gm.graph.nodes:
        p, training = dropout_args(node) if node.target is F.dropout else (0, False)
        if training and p != 0:
            where = (module_paths(node) or [node.name])[-1] or "the model"
            return f"dropout is active in {where} (model in training mode): call model.eval() for the rewrite"
    return None


def _dump(directory: str, name: str, gm: fx.GraphModule) -> None:
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
        (path / name).touch()
    except OSError as error:
        raise OptionError(f"moeshard: option 'dump_dir': cannot write dumps into {directory!r}: "
                          f"{type(error).__name__}: {error.strerror or error}") from None
    (path / name).write_text(gm.print_readable(print_output=False, include_stride=False, include_device=False))
    log.debug("moeshard: wrote %s", os.path.join(directory, name))
