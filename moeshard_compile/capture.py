"""Capture shims: let Dynamo trace HF experts that loop over a data-dependent `nonzero()`.

HF Switch, NLLB-MoE and transformers' `eager` experts implementation iterate over
`expert_hit = (...).nonzero()`, which Dynamo cannot unroll (a graph break, even with
fullgraph=True). Each shim replaces that loop by a static `for e in range(E)` with the same
arithmetic, and only while Dynamo traces (`torch.compiler.is_compiling()`): eager calls run
the original code untouched. Experts that get no token contribute nothing either way.
"""

from __future__ import annotations

import functools
import importlib
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def _switch_experts(self, hidden_states, selected_experts, routing_weights):
    final_hidden_states = torch.zeros_like(hidden_states)
    expert_mask = selected_experts.permute(2, 1, 0)  # [E, 1, T]
    for expert in range(self.num_experts):
        slot, token = torch.where(expert_mask[expert])
        out = self[f"expert_{expert}"](hidden_states[token]) * routing_weights[token, slot, None]
        final_hidden_states.index_add_(0, token, out.to(hidden_states.dtype))
    return final_hidden_states


def _nllb_experts(self, hidden_states, router_mask, router_probs):
    final_hidden_states = torch.zeros_like(hidden_states)
    expert_mask = F.one_hot(router_mask, num_classes=self.num_experts).permute(2, 1, 0)
    for expert in range(self.num_experts):
        slot, token = torch.where(expert_mask[expert])
        out = self[f"expert_{expert}"](hidden_states[token]) * router_probs[token, slot, None]
        if self.moe_token_dropout > 0:
            out = self.token_dropout(out) if self.training else out * (1 - self.moe_token_dropout)
        final_hidden_states.index_add_(0, token, out.to(hidden_states.dtype))
    return final_hidden_states


def _project(module, x, weight, bias):
    y = x @ weight if module.is_transposed else F.linear(x, weight)
    return y + bias if bias is not None else y


def _stacked_eager_experts(self, hidden_states, top_k_index, top_k_weights):
    """transformers' eager experts loop (integrations/moe.py), over range(E)."""
    final_hidden_states = torch.zeros_like(hidden_states)
    expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
    has_bias = getattr(self, "has_bias", False)
    for expert in range(self.num_experts):
        slot, token = torch.where(expert_mask[expert])
        x = hidden_states[token]
        if getattr(self, "has_gate", True):
            bias = self.gate_up_proj_bias[expert] if has_bias else None
            h = self._apply_gate(_project(self, x, self.gate_up_proj[expert], bias))
        else:
            bias = self.up_proj_bias[expert] if has_bias else None
            h = self.act_fn(_project(self, x, self.up_proj[expert], bias))
        out = _project(self, h, self.down_proj[expert], self.down_proj_bias[expert] if has_bias else None)
        if getattr(self, "has_post_expert_norm", False):
            out = self.post_expert_norm(out)
        out = out * top_k_weights[token, slot, None]
        final_hidden_states.index_add_(0, token, out.to(final_hidden_states.dtype))
    return final_hidden_states


def _eager_experts_interface(self, *args, **kwargs):
    """Registered as transformers' "eager" experts function: the static loop under Dynamo,
    the class's own forward (kept by `use_experts_implementation` as __wrapped__) otherwise."""
    if torch.compiler.is_compiling():
        return _stacked_eager_experts(self, *args, **kwargs)
    return type(self).forward.__wrapped__(self, *args, **kwargs)


_CLASS_SHIMS = {
    "transformers.models.switch_transformers.modeling_switch_transformers": ("SwitchTransformersExperts", _switch_experts),
    "transformers.models.nllb_moe.modeling_nllb_moe": ("NllbMoeExperts", _nllb_experts),
}


def _shim_class(cls, static_forward) -> None:
    original = cls.forward
    if getattr(original, "_moeshard_original", None) is not None:
        return

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        if torch.compiler.is_compiling():
            return static_forward(self, *args, **kwargs)
        return original(self, *args, **kwargs)

    forward._moeshard_original = original
    cls.forward = forward


def install() -> list[str]:
    """Install every shim whose transformers class exists; returns what was patched."""
    installed = []
    for module_name, (class_name, static_forward) in _CLASS_SHIMS.items():
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as error:
            log.debug("moeshard: no capture shim for %s.%s (%s)", module_name, class_name, error)
            continue
        _shim_class(cls, static_forward)
        installed.append(class_name)
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError as error:
        log.debug("moeshard: no transformers experts interface (%s)", error)
    else:
        if "eager" not in ALL_EXPERTS_FUNCTIONS:
            ALL_EXPERTS_FUNCTIONS["eager"] = _eager_experts_interface
        installed.append("experts_implementation=eager")
    return installed
