"""HF MoE decoder stacks at real layer shapes (or scaled down for --smoke), random weights, and the
matmul FLOPs of one forward: what bench/decoder_prefill.py builds and floors.

Each family is its transformers config with 2 decoder layers, vocabulary 1024 and use_cache=False
(the forward alone, no KV cache written); `AutoModel.from_config` gives the decoder stack
(embedding, layers, final norm: no lm head), whose last_hidden_state is what is timed and checked.
Names carry their shape: B sequences, L tokens per sequence, T = B*L tokens, D model dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    AutoModel,
    DeepseekV3Config,
    GptOssConfig,
    MixtralConfig,
    OlmoeConfig,
    PretrainedConfig,
    Qwen3MoeConfig,
)

VOCAB = 1024
LAYERS = 2


@dataclass(frozen=True)
class Family:
    """One model family: its config class, the real layer shapes and the --smoke ones."""

    config_class: type[PretrainedConfig]
    real: dict
    smoke: dict
    attention: str = "sdpa"
    about: str = ""


FAMILIES = {
    "qwen3": Family(
        Qwen3MoeConfig, about="Qwen3-30B-A3B",
        real=dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                  num_attention_heads=32, num_key_value_heads=4, head_dim=128, norm_topk_prob=True),
        smoke=dict(hidden_size=32, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, norm_topk_prob=True),
    ),
    "mixtral": Family(
        MixtralConfig, about="Mixtral-8x7B",
        real=dict(hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2,
                  num_attention_heads=32, num_key_value_heads=8),
        smoke=dict(hidden_size=32, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
                   num_attention_heads=4, num_key_value_heads=2),
    ),
    "olmoe": Family(
        OlmoeConfig, about="OLMoE-1B-7B",
        real=dict(hidden_size=2048, intermediate_size=1024, num_experts=64, num_experts_per_tok=8,
                  num_attention_heads=16, num_key_value_heads=16, eos_token_id=None),
        smoke=dict(hidden_size=32, intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                   num_attention_heads=4, num_key_value_heads=4, eos_token_id=None),
    ),
    # DeepSeek-V2-Lite's shapes in DeepseekV3's modules: ungrouped top-6 of 64 routed experts plus
    # 2 shared ones (one MLP of 2 x 1408), every layer MoE (first_k_dense_replace=0), and its
    # multi-head latent attention: 16 heads, q_proj direct (q_lora_rank None), kv_lora_rank 512,
    # q/k head dim 128 + 64 (rope), v head dim 128.
    "deepseek_v3": Family(
        DeepseekV3Config, about="DeepSeek-V2-Lite shapes",
        real=dict(hidden_size=2048, moe_intermediate_size=1408, n_routed_experts=64, n_shared_experts=2,
                  num_experts_per_tok=6, n_group=1, topk_group=1, first_k_dense_replace=0,
                  num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None, kv_lora_rank=512,
                  qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128),
        smoke=dict(hidden_size=32, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=2,
                   num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=0,
                   num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16,
                   qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8),
    ),
    # gpt-oss-20b: layer 0 attends through a 128-token sliding window, layer 1 to every token before
    # it. Eager attention: its attention sinks have no SDPA path in transformers.
    "gpt_oss": Family(
        GptOssConfig, attention="eager", about="gpt-oss-20b",
        real=dict(hidden_size=2880, intermediate_size=2880, num_local_experts=32, num_experts_per_tok=4,
                  num_attention_heads=64, num_key_value_heads=8, head_dim=64, sliding_window=128,
                  layer_types=["sliding_attention", "full_attention"]),
        smoke=dict(hidden_size=32, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=8,
                   layer_types=["sliding_attention", "full_attention"]),
    ),
}


def build_decoder(name: str, smoke: bool, dtype: torch.dtype, device: torch.device, seed: int) -> torch.nn.Module:
    """The family's decoder stack with random weights, built on the device directly, in eval mode."""
    family = FAMILIES[name]
    config = family.config_class(**(family.smoke if smoke else family.real), vocab_size=VOCAB,
                                 num_hidden_layers=LAYERS, use_cache=False, attn_implementation=family.attention)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModel.from_config(config, dtype=dtype)
    return model.eval()


def describe(model: torch.nn.Module) -> str:
    """The shapes a table row stands for, as one line."""
    config = model.config
    moe = model.layers[0].mlp
    experts, top_k = moe.experts.num_experts, config.num_experts_per_tok
    shared = " + shared experts" if hasattr(moe, "shared_experts") else ""
    return (f"{type(model).__name__} ({LAYERS} layers): D={config.hidden_size} E={experts} K={top_k}{shared}, "
            f"heads {config.num_attention_heads}, attention {config._attn_implementation}, "
            f"experts {config._experts_implementation}")


def decoder_flops(model: torch.nn.Module, batch: int, seq: int) -> tuple[int, int]:
    """(whole stack, routed experts) matmul FLOPs of one forward over B x L tokens, per layer:
        attention projections  2*T * (the attention's Linear weights: q, k, v, o; MLA's low-rank ones)
        scores and values      2 * B*pairs * H * (q/k head dim + v head dim), pairs = the (query, key)
                               pairs attended: L(L+1)/2 causal, fewer in a sliding window
        router                 2*T * D*E
        routed experts         2*T*K * (one expert's matmul weights: D*F*3 gated)
        shared experts         2*T * (their Linear weights)
    Read off the built modules, so each family's own projections are counted."""
    config, tokens = model.config, batch * seq
    heads = config.num_attention_heads
    qk_head_dim = (getattr(config, "qk_head_dim", None) or getattr(config, "head_dim", None)
                   or config.hidden_size // heads)
    v_head_dim = getattr(config, "v_head_dim", None) or qk_head_dim
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * LAYERS
    total = routed = 0
    for layer, layer_type in zip(model.layers, layer_types):
        window = config.sliding_window if layer_type == "sliding_attention" else None
        total += 2 * tokens * _linear_weights(layer.self_attn)
        total += 2 * batch * attended_pairs(seq, window) * heads * (qk_head_dim + v_head_dim)
        moe = layer.mlp
        router = getattr(moe, "gate", None) or moe.router
        total += 2 * tokens * router.weight.numel()
        per_expert = sum(w[0].numel() for w in moe.experts.parameters() if w.dim() == 3)  # biases are 2-D
        routed += 2 * tokens * config.num_experts_per_tok * per_expert
        if hasattr(moe, "shared_experts"):
            total += 2 * tokens * _linear_weights(moe.shared_experts)
    return total + routed, routed


def attended_pairs(seq: int, window: int | None) -> int:
    """(query, key) pairs of a causal sequence of `seq` tokens, each seeing at most `window` keys."""
    if window is None or window >= seq:
        return seq * (seq + 1) // 2
    return window * (window + 1) // 2 + (seq - window) * window


def _linear_weights(module: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))
