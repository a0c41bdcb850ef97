"""Capture shims: let Dynamo trace HF experts that loop over a data-dependent `nonzero()`.

HF Switch, NLLB-MoE and transformers' `eager` experts implementation iterate over
`expert_hit = (...).nonzero()`, which Dynamo cannot unroll (a graph break; with fullgraph=True
an error). Each shim replaces that loop, only while Dynamo traces
(`torch.compiler.is_compiling()`; eager calls run the original code untouched), by a static
loop over range(E) in the dense masked form:

    out = out + where(w_e != 0, expert_e(x) * w_e, 0)      # w_e: [T, 1], 0 where not routed

This form has no data-dependent shape, so it captures as one graph with or without
fullgraph=True, and moeshard's recogniser turns it into one sparse grouped computation.
Other backends (e.g. plain Inductor) keep tracing HF's own code: the shims check, at trace
time, that the frame is being compiled for moeshard.
Values equal the original loop: routed tokens get the same products, added in the same
expert order; unrouted ones add an exact 0. Only a graph the backend does not rewrite (see
the report) pays for computing every expert on every token.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import logging

import torch
import torch.nn.functional as F

from moeshard_compile.static_loops import static_version

log = logging.getLogger(__name__)


@torch._dynamo.assume_constant_result
def tracing_for_moeshard() -> bool:
    """True while Dynamo traces a frame that moeshard will compile.

    Evaluated once at trace time and baked into the graph; Dynamo keeps separate cache entries
    per backend, so a model compiled by another backend traces the original code. If Dynamo's
    internals cannot be read (another torch version), the shims stay on: correct, never silent.
    """
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        fn = InstructionTranslator.current_tx().output.compiler_fn
    except Exception:  # noqa: BLE001 - private API: degrade to "always shim"
        return True
    for _ in range(8):  # torch.compile wraps the backend a few times
        if fn is None:
            return False
        if getattr(fn, "_moeshard", False):
            return True
        fn = getattr(fn, "compiler_fn", None) or getattr(fn, "__wrapped__", None)
    return False


def _keep(**settings) -> bool:
    """Change the frame being traced's shape settings (and turn fake-tensor caching off)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        output = InstructionTranslator.current_tx().output
        output.shape_env.settings = dataclasses.replace(output.shape_env.settings, **settings)
        output.fake_mode.cache_enabled = False
    except Exception:  # noqa: BLE001 - private API: without it the loop still runs, in pieces
        log.debug("moeshard: could not keep data-dependent shapes in this graph", exc_info=True)
    return True


@torch._dynamo.assume_constant_result
def keep_data_dependent_shapes() -> bool:
    """Let the frame being traced keep `where` / `nonzero` in its graph, as fullgraph=True does,
    instead of breaking it there: a static loop selects each expert's tokens by data-dependent
    shapes, and a graph break between the experts would hide the layer from moeshard.

    Fake-tensor caching goes off for the rest of the frame: every op after a selection has fresh
    unbacked sizes, so its entries are made and never reused (a quarter of the tracing time)."""
    return _keep(allow_dynamic_output_shape_ops=True)


@torch._dynamo.assume_constant_result
def keep_listed_counts() -> bool:
    """As keep_data_dependent_shapes, and `.tolist()` of the router's per-expert counts stays in
    the graph as ints (JetMoE's router hands them to experts that split their rows by them). Only
    for such routers: in a frame that lists a tensor of data-dependent length, Dynamo would fail
    where it otherwise breaks the graph."""
    return _keep(allow_dynamic_output_shape_ops=True, allow_scalar_outputs=True)


def _switch_router_logits(self, hidden_states):
    """The router's linear in its own dtype, without HF's `self.classifier = self.classifier.to(...)`:
    that module mutation builds new Parameters, which Dynamo cannot trace (a graph break that
    would cut the routing off from the experts). The cast weights hold the same values."""
    self.input_dtype = hidden_states.dtype
    weight = self.classifier.weight.to(self.dtype)
    bias = self.classifier.bias.to(self.dtype) if self.classifier.bias is not None else None
    return F.linear(hidden_states.to(self.dtype), weight, bias)


def _switch_router_argmax(self, hidden_states):
    """transformers >= 5.2x SwitchTransformersTop1Router.forward (eval mode)."""
    router_logits = _switch_router_logits(self, hidden_states)
    router_probs = F.softmax(router_logits, dim=-1, dtype=self.dtype).to(self.input_dtype)
    expert_index = F.one_hot(torch.argmax(router_probs, dim=-1), num_classes=self.num_experts)
    token_priority = torch.cumsum(expert_index, dim=-2)
    expert_index = expert_index * (token_priority <= self.expert_capacity)
    router_probs = torch.max(router_probs, dim=-1).values.unsqueeze(-1)
    return expert_index, router_probs, router_logits


def _switch_router_max_keepdim(self, hidden_states):
    """transformers 5.17 SwitchTransformersTop1Router.forward (eval mode)."""
    router_logits = _switch_router_logits(self, hidden_states)
    router_probs = F.softmax(router_logits, dim=-1, dtype=self.dtype).to(self.input_dtype)
    router_logits, expert_index = torch.max(router_probs, dim=-1, keepdim=True)
    expert_index = F.one_hot(expert_index, num_classes=self.num_experts)
    token_priority = torch.cumsum(expert_index, dim=-2)
    expert_index = expert_index * (token_priority <= self.expert_capacity)
    router_probs = torch.max(router_probs, dim=-1).values.unsqueeze(-1)
    return router_probs, expert_index, router_logits


# Router versions we reimplement, told apart by a line only that version's source has.
_SWITCH_ROUTERS = {
    "expert_index = torch.argmax(router_probs, dim=-1)": _switch_router_argmax,
    "router_logits, expert_index = torch.max(router_probs, dim=-1, keepdim=True)": _switch_router_max_keepdim,
}


def _switch_router_shim(cls):
    """The reimplementation matching this transformers' router, or None (then HF's code runs)."""
    try:
        source = inspect.getsource(getattr(cls.forward, "_moeshard_original", cls.forward))
    except (OSError, TypeError):
        return None
    matches = [shim for line, shim in _SWITCH_ROUTERS.items() if line in source]
    return matches[0] if len(matches) == 1 else None


def _nllb_cast_classifier(original):
    """NLLB's router re-casts its classifier with `Module.to` on every call; under Dynamo that
    builds Parameters (a graph break between routing and experts) even when nothing changes.
    Skip the call when the classifier already has the router's dtype, as `.to` would."""

    @functools.wraps(original)
    def cast_classifier(self):
        already = all(p.dtype == self.dtype for p in self.classifier.parameters())
        if already and torch.compiler.is_compiling() and tracing_for_moeshard():
            return None
        return original(self)

    cast_classifier._moeshard_original = original
    return cast_classifier


def _eager_experts_interface(self, *args, **kwargs):
    """Registered as transformers' "eager" experts function: the static loop under Dynamo,
    the class's own forward (kept by `use_experts_implementation` as __wrapped__) otherwise."""
    static = getattr(type(self), "_moeshard_static_forward", None)
    if static is not None and torch.compiler.is_compiling() and tracing_for_moeshard() and not self.training:
        return static(self, *args, **kwargs)
    return type(self).forward.__wrapped__(self, *args, **kwargs)


_SWITCH = "transformers.models.switch_transformers.modeling_switch_transformers"
_CLASS_SHIMS = {
    (_SWITCH, "SwitchTransformersTop1Router"): _switch_router_shim,  # picked by transformers version
}


def _shim_class(cls, static_forward) -> None:
    original = cls.forward
    if getattr(original, "_moeshard_original", None) is not None:
        return

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        if torch.compiler.is_compiling() and tracing_for_moeshard() and not self.training:
            return static_forward(self, *args, **kwargs)
        return original(self, *args, **kwargs)

    forward._moeshard_original = original
    cls.forward = forward


def _keeping_data_dependent_shapes(static_forward):
    keep = keep_listed_counts if getattr(static_forward, "_moeshard_lists_counts", False) else keep_data_dependent_shapes

    @functools.wraps(static_forward)
    def forward(self, *args, **kwargs):
        keep()
        return static_forward(self, *args, **kwargs)

    return forward


def shim_nonzero_loops(cls) -> bool:
    """Trace `cls.forward` with its loops over `nonzero()` static (moeshard_compile.static_loops)."""
    forward = cls.__dict__.get("forward")
    if forward is None or getattr(forward, "_moeshard_original", None) is not None:
        return False
    if hasattr(forward, "__wrapped__"):  # transformers' experts dispatch: the eager function takes it
        static = static_version(forward.__wrapped__)
        if static is not None:
            cls._moeshard_static_forward = _keeping_data_dependent_shapes(static)
        return static is not None
    static = static_version(forward)
    if static is None:
        return False
    _shim_class(cls, _keeping_data_dependent_shapes(static))
    return True


def _shim_every_module() -> None:
    """Every nn.Module class, defined now or later, whose forward loops over `nonzero()`."""
    stack = list(torch.nn.Module.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        shim_nonzero_loops(cls)
    if getattr(torch.nn.Module.__init_subclass__, "_moeshard", False):
        return

    @classmethod
    def init_subclass(cls, **kwargs):
        super(torch.nn.Module, cls).__init_subclass__(**kwargs)
        shim_nonzero_loops(cls)

    init_subclass.__func__._moeshard = True
    torch.nn.Module.__init_subclass__ = init_subclass


def install() -> list[str]:
    """Install every shim whose transformers class exists; returns what was patched."""
    _shim_every_module()
    installed = []
    for (module_name, class_name), static_forward in _CLASS_SHIMS.items():
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as error:
            log.debug("moeshard: no capture shim for %s.%s (%s)", module_name, class_name, error)
            continue
        static_forward = static_forward(cls) if static_forward is _switch_router_shim else static_forward
        if static_forward is None:
            log.info("moeshard: %s of this transformers version is not known; it is traced as it is", class_name)
            continue
        _shim_class(cls, static_forward)
        installed.append(class_name)
    try:
        from transformers.models.nllb_moe.modeling_nllb_moe import NllbMoeTop2Router
    except ImportError:
        pass
    else:
        if getattr(NllbMoeTop2Router._cast_classifier, "_moeshard_original", None) is None:
            NllbMoeTop2Router._cast_classifier = _nllb_cast_classifier(NllbMoeTop2Router._cast_classifier)
            installed.append("NllbMoeTop2Router._cast_classifier")
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError as error:
        log.debug("moeshard: no transformers experts interface (%s)", error)
    else:
        if ALL_EXPERTS_FUNCTIONS.get("eager") in (None, _eager_experts_interface):
            ALL_EXPERTS_FUNCTIONS["eager"] = _eager_experts_interface
            installed.append("experts_implementation=eager")
        else:
            log.info("moeshard: transformers' 'eager' experts function is already overridden; not shimmed")
    return installed
