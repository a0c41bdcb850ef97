"""Routing generators for MoE benchmarks: which expert(s) each of T tokens goes to, and its weight.

Every generator returns `(ids_TK, weight_TK)`: int64 expert ids and gate weights of shape [T, K]
on `device` (K = 1 for Switch-style top-1). The synthetic ones are seeded (same seed, same routing
on every rank and every run) and draw on the device itself, so a GPU benchmark copies nothing.

    model      a router's logits: softmax, top-k, weights are the chosen probabilities
    uniform    every expert equally likely
    skew       the MoEShard paper's synthetic router (arXiv 2503.08467): p_i ∝ 1/E + alpha for the
               first k_r = max(1, floor(E / 10)) experts, 1/E for the rest (alpha = 0.6)
    zipf       p_i ∝ 1 / (i + 1)^s

Synthetic top-k draws K distinct experts per token without replacement (torch.multinomial): the
first choice follows p exactly, later ones follow p renormalised over the experts not yet chosen.
Synthetic weights are uniform in [0, 1), renormalised to sum 1 over K when K > 1 (as top-k
routers with renormalisation do); the weight only scales outputs, so any non-trivial value serves.

Names carry their shape: T tokens, E experts, K experts per token.
"""

from __future__ import annotations

import torch

SKEW_ALPHA = 0.6  # the paper's alpha
SKEW_HOT_FRACTION = 0.1  # the paper's k_r = 10% of E


def model_routing(logits_TE: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A real router's decision: softmax over experts, the top-k, their probabilities as weights.

    For k = 1 this is Switch's and DeepSpeed's top1gating (argmax; the weight is the softmax
    probability, not renormalised).
    """
    probs_TE = torch.softmax(logits_TE.float(), dim=-1)
    weight_TK, ids_TK = torch.topk(probs_TE, k, dim=-1)
    return ids_TK, weight_TK.to(logits_TE.dtype)


def uniform_probs(num_experts: int) -> torch.Tensor:
    return torch.full((num_experts,), 1.0 / num_experts, dtype=torch.float64)


def skew_probs(num_experts: int, alpha: float = SKEW_ALPHA, hot_fraction: float = SKEW_HOT_FRACTION) -> torch.Tensor:
    """The paper's synthetic skew: the first k_r experts get 1/E + alpha, the rest 1/E, normalised."""
    hot = max(1, int(num_experts * hot_fraction))
    weights_E = torch.full((num_experts,), 1.0 / num_experts, dtype=torch.float64)
    weights_E[:hot] += alpha
    return weights_E / weights_E.sum()


def zipf_probs(num_experts: int, s: float = 1.0) -> torch.Tensor:
    """Zipf's law over experts in index order: expert 0 hottest."""
    weights_E = 1.0 / torch.arange(1, num_experts + 1, dtype=torch.float64) ** s
    return weights_E / weights_E.sum()


def sample_routing(
    probs_E: torch.Tensor, num_tokens: int, k: int = 1, seed: int = 0, device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K distinct experts per token drawn from probs_E, and random weights; seeded, drawn on `device`."""
    if not 1 <= k <= probs_E.numel():
        raise ValueError(f"k={k} must be in 1..{probs_E.numel()} (the number of experts)")
    generator = torch.Generator(device=device).manual_seed(seed)
    probs_TE = probs_E.to(device=device, dtype=torch.float32).expand(num_tokens, -1)
    ids_TK = torch.multinomial(probs_TE, k, replacement=False, generator=generator) if num_tokens else (
        torch.empty(0, k, dtype=torch.int64, device=device))
    weight_TK = torch.rand(num_tokens, k, generator=generator, device=device, dtype=torch.float32)
    if k > 1:
        weight_TK = weight_TK / weight_TK.sum(dim=-1, keepdim=True)
    return ids_TK, weight_TK.to(dtype)


SYNTHETIC = {"uniform": uniform_probs, "skew": skew_probs, "zipf": zipf_probs}


def synthetic_routing(
    kind: str, num_tokens: int, num_experts: int, k: int = 1, seed: int = 0, device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32, **params: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One of SYNTHETIC by name; `params` go to its probability function (alpha, hot_fraction, s)."""
    if kind not in SYNTHETIC:
        raise ValueError(f"unknown routing {kind!r}; choose from {', '.join(SYNTHETIC)} (or model_routing)")
    return sample_routing(SYNTHETIC[kind](num_experts, **params), num_tokens, k, seed, device, dtype)
