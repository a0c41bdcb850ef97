"""Every MoE model family of the installed transformers, as a tiny random-weight model.

A test helper (not a test file): `FAMILIES` lists the MoE families by `model_type`,
`tiny_model(model_type)` builds one in float32 with random weights (no downloads) and returns
`(model, inputs, expected_moe_layers)`.

How the zoo is made:
  * a family is a config class in `transformers.CONFIG_MAPPING` whose default config carries an
    expert attribute (`MOE_ATTRS`, or `ffn_config.moe_num_experts` for DBRX);
  * composite (multimodal, omni) configs whose `text_config` is itself a listed MoE family are
    left out and named in `COVERED_BY`: their MoE layers are the text model's;
  * sizes come from one generic table (`SHRINK`, applied to the attributes a config has) plus a
    short per-family override dict (`OVERRIDES`) where a config needs something else, so a new
    family usually needs no code at all;
  * families whose MoE cannot run from token ids alone are listed with a reason in `UNBUILDABLE`.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import torch

VOCAB = 64
BATCH, SEQ = 2, 6
HIDDEN = 32
LAYERS = 2
EXPERTS = 4
TOP_K = 2

# A config with any of these (non-empty) is an MoE family.
MOE_ATTRS = (
    "num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok",
    "moe_k", "moe_topk", "expert_capacity", "top_k_experts",
)

# Composite configs whose MoE layers are those of their text model (the family listed instead).
COVERED_BY = {
    "aria": "aria_text",
    "deepseek_ocr2": "deepseek_ocr2_text",
    "diffusion_gemma": "diffusion_gemma_text",
    "dots3_note": "dots3_note_text",  # its vision encoder is an MoE too: dots3_note_vision_encoder
    "ernie4_5_vl_moe": "ernie4_5_vl_moe_text",
    "gemma4": "gemma4_text",
    "gemma4_assistant": "gemma4_text",  # its default config does not validate; text_config is gemma4_text
    "glm4v_moe": "glm4v_moe_text",
    "glm5_next": "glm5_next_text",
    "hy_v4_vl": "hy_v4_vl_text",
    "inkling2": "inkling2_text",
    "inkling2_loop": "inkling2_loop_text",
    "inkling_mm_model": "inkling_text",
    "kimi_k25": "deepseek_v3",
    "llama4": "llama4_text",
    "minimax_m3_vl": "minimax_m3_vl_text",
    "mistral_large4": "mistral_large4_text",
    "muse_spark": "muse_spark_text",
    "nemo_speechlm": "nemotron_h",
    "nemotron_h_omni": "nemotron_h",
    "qwen3_5_moe": "qwen3_5_moe_text",
    "qwen3_omni_moe": "qwen3_omni_moe_text",  # thinker; its talker is qwen3_omni_moe_talker_text
    "qwen3_omni_moe_thinker": "qwen3_omni_moe_text",
    "qwen3_vl_moe": "qwen3_vl_moe_text",
    "qwen4_exp": "qwen4_exp_text",
    "step3p7": "step3p5",
    "unlimited_ocr": "unlimited_ocr_text",
    "vitpose": "vitpose_backbone",
}

# Families listed but not built, with the reason.
UNBUILDABLE = {
    "dots3_note_vision_encoder": "vision encoder only: its MoE runs on image patches (pixel_values + grid_thw), no token input",
    "vitpose_backbone": "vision backbone only: its MoE MLP runs on pixel_values with a dataset_index, no token input",
}

# Families fed inputs_embeds instead of input_ids, with the reason.
EMBEDS_INPUT = {
    "qwen3_omni_moe_talker_text": "the talker reads the thinker's hidden states; its forward's embed_tokens "
    "lookup names a module it does not have (it has codec_embedding)",
}

# MoE layers that token-only inputs never run, by module-name part: left out of the expected count.
UNREACHED = {
    "ernie4_5_vl_moe_text": ("vision_moe",),  # runs only with moe_mm_token_type_ids marking image tokens
}

# Generic sizes, applied to each attribute the family's config has.
SHRINK = {
    # widths
    "hidden_size": HIDDEN, "d_model": HIDDEN, "n_embd": HIDDEN,
    "intermediate_size": 48, "moe_intermediate_size": 16, "expert_ffn_hidden_size": 16, "ffn_hidden_size": 48,
    "shared_expert_intermediate_size": 24, "shared_experts_intermediate_size": 24, "shared_intermediate_size": 24,
    "moe_shared_expert_intermediate_size": 24, "share_expert_dim": 24, "dense_intermediate_size": 48,
    "intermediate_size_mlp": 48, "moe_hidden_size": 16, "d_ff": 48, "encoder_ffn_dim": 48, "decoder_ffn_dim": 48,
    "router_hidden_size": 16, "ple_embed_dim": 16, "hc_lowrank": 8, "hidden_size_per_layer_input": 8,
    # depth: two layers, every one an MoE layer where the config allows
    "num_hidden_layers": LAYERS, "num_layers": LAYERS, "n_layers": LAYERS, "encoder_layers": LAYERS,
    "decoder_layers": LAYERS, "num_decoder_layers": LAYERS, "num_sparse_encoder_layers": LAYERS,
    "num_sparse_decoder_layers": LAYERS, "first_k_dense_replace": 0, "num_dense_layers": 0,
    "decoder_sparse_step": 1, "encoder_sparse_step": 1, "mlp_only_layers": [], "moe_layer_freq": 1,
    "expert_layer_period": 1, "expert_layer_offset": 0, "interleave_moe_layer_step": 1,
    "moe_layer_start_index": 0, "moe_layer_end_index": LAYERS - 1, "moe_layer_interval": 1,
    "num_nextn_predict_layers": 0, "num_kv_shared_layers": 0,
    # experts
    "num_experts": EXPERTS, "num_local_experts": EXPERTS, "n_routed_experts": EXPERTS, "moe_num_experts": EXPERTS,
    "num_experts_per_tok": TOP_K, "num_experts_per_token": TOP_K, "moe_k": TOP_K, "moe_topk": TOP_K,
    "top_k_experts": TOP_K, "n_shared_experts": 1, "n_group": 1, "topk_group": 1, "num_expert_group": 1, "expert_capacity": 8, "zero_expert_num": 2,
    # attention
    "num_attention_heads": 2, "num_key_value_heads": 2, "n_heads": 2, "num_heads": 2, "head_dim": 16,
    "encoder_attention_heads": 2, "decoder_attention_heads": 2, "d_kv": 8, "kv_channels": 16,
    "q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "qk_head_dim": 16,
    "v_head_dim": 16, "index_n_heads": 2, "index_num_heads": 1, "index_head_dim": 16, "index_topk": 8, "o_lora_rank": 16, "o_groups": 1,
    "swa_head_dim": 16, "swa_num_attention_heads": 2, "swa_num_key_value_heads": 2, "rotary_dim": 8,
    "num_sliding_attention_heads": 2, "linear_num_heads": 2, "linear_head_dim": 16,
    "linear_num_key_heads": 2, "linear_num_value_heads": 2, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
    # state-space / conv mixers of the hybrids
    "mamba_d_state": 8, "mamba_n_heads": 4, "mamba_num_heads": 4, "mamba_d_head": 16, "mamba_head_dim": 16,
    "mamba_dt_rank": 4, "ssm_state_size": 8, "mamba_chunk_size": 8, "chunk_size": 8, "n_groups": 1,
    # positions and vocabulary
    "vocab_size": VOCAB, "max_position_embeddings": 64, "max_seq_len": 64, "sliding_window": 16,
    "sliding_window_size": 16, "attention_chunk_size": 16, "unpadded_vocab_size": VOCAB,
    "vocab_size_per_layer_input": VOCAB, "model_max_length": 64,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 2,
    "eod_token_id": 2, "sep_token_id": 2,
}

# Per-family exceptions to the table, by model_type (merged over SHRINK's values).
OVERRIDES: dict[str, dict] = {
    "dbrx": dict(  # sizes live in nested attention / FFN configs
        attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
        ffn_config=dict(ffn_hidden_size=16, moe_num_experts=EXPERTS, moe_top_k=TOP_K),
    ),
    "diffusion_gemma_text": dict(enable_moe_block=True, global_head_dim=16),  # MoE block off by default
    "doge": dict(is_moe=True),  # its cross-domain MoE MLP is off by default
    "dots3_note_text": dict(  # the sliding layers' own MLA sizes
        swa_num_attention_heads=2, swa_num_key_value_heads=2, swa_q_lora_rank=16, swa_kv_lora_rank=16,
        swa_head_dim=16, swa_qk_nope_head_dim=8, swa_v_head_dim=16,
    ),
    "ernie4_5_vl_moe_text": dict(  # [text experts, vision experts]; mrope sections sum to head_dim / 2
        moe_intermediate_size=[16, 16], rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[3, 3, 2]),
    ),
    "gemma4_text": dict(enable_moe_block=True, global_head_dim=16),  # MoE block off by default; full layers' head_dim
    "glm4v_moe_text": dict(
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[4, 2, 2], partial_rotary_factor=1.0),
    ),
    "glm5_next_text": dict(index_kpool=4, qk_rope_head_dim=0, qk_nope_head_dim=16),  # index_topk % kpool == 0; DSA is NoPE
    "granitemoehybrid": dict(layer_types=["linear_attention", "full_attention"]),  # one mamba, one attention layer
    "hy_v4_vl_text": dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1])),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1),  # layer 0 mamba, layer 1 attention; both MoE
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=0),  # the model reads layer_types
    "llama4_text": dict(no_rope_layers=[1] * LAYERS),
    "mimo_v2_flash": dict(num_attention_heads=4, num_key_value_heads=1),  # sliding layers double the kv heads
    "mistral4": dict(head_dim=16),  # MLA whose head_dim is nope + rope (8 + 8)
    "nemotron_h": dict(layers_block_type=["full_attention", "moe"]),  # a layer is attention OR moe: 1 MoE layer
    "qwen3_omni_moe_talker_text": dict(shared_expert_intermediate_size=24),  # read by the model, no config field
    "qwen4_exp_text": dict(  # its full-attention layers are indexed (QSA) and need the indexer's sizes
        indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=8, indexer_compress_ratio=2,
    ),
    "zaya": dict(num_experts_per_tok=1),  # ZAYA supports top-1 only
}

# Attributes that hold one entry per layer: rebuilt for LAYERS layers (see `_per_layer`).
PER_LAYER = (
    "layer_types", "mlp_layer_types", "layers_block_type", "indexer_types", "num_attention_heads_per_layer",
    "layer_rope_theta", "no_rope_layers", "kv_source_layers", "moe_layers",
)
SPARSE_WORDS = ("sparse", "moe")
MIXER_LISTS = ("layer_types", "layers_block_type", "indexer_types")

# A module is an MoE layer when it owns an experts bank as a direct child under one of these names.
EXPERT_BANK_NAMES = ("experts", "moe_experts", "routed_experts")


def _default_config(model_type: str):
    from transformers import CONFIG_MAPPING

    with _quiet():
        return CONFIG_MAPPING[model_type]()


@contextlib.contextmanager
def _quiet():
    """Config validation warns loudly about token ids outside the vocabulary; keep survey output readable."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)


def _has(config, name) -> bool:
    """hasattr that treats a raising attribute (heterogeneous per-layer configs raise) as present."""
    try:
        return hasattr(config, name)
    except Exception:
        return True


def is_moe_config(config) -> bool:
    """True when the config has an expert attribute (at the top level, or DBRX's ffn_config).

    Presence, not value: Gemma 4's text config defaults to num_experts=None (MoE block off)
    and is an MoE family all the same.
    """
    if any(_has(config, name) for name in MOE_ATTRS):
        return True
    ffn = getattr(config, "ffn_config", None)
    return ffn is not None and _has(ffn, "moe_num_experts")


def _discover() -> list[str]:
    """The MoE model_types of CONFIG_MAPPING whose default config builds, composites left out."""
    from transformers import CONFIG_MAPPING

    found = []
    for model_type in sorted(CONFIG_MAPPING.keys()):
        if model_type in COVERED_BY:
            continue
        try:
            config = _default_config(model_type)
        except Exception:
            continue  # a config that cannot even default-construct is no family we can shrink
        if is_moe_config(config):
            found.append(model_type)
    return found


FAMILIES: list[str] = _discover()


def _per_layer(name: str, default: list, n: int) -> list:
    """A per-layer list for `n` layers, from the default config's list.

    MLP-type lists become all-MoE; layer-id lists become range(n); mixer-type lists keep their
    first `n` *distinct* values in order, so a hybrid keeps one layer of each kind (a
    linear-attention-only stack has no layer that tracks the cache's sequence length).
    """
    if name == "mlp_layer_types":
        sparse = next((v for v in default if isinstance(v, str) and any(w in v for w in SPARSE_WORDS)), None)
        return [sparse] * n if sparse else list(default[:n])
    if name in ("moe_layers", "kv_source_layers"):
        return list(range(n))
    if name == "num_attention_heads_per_layer":
        return [SHRINK["num_attention_heads"]] * n
    distinct = list(dict.fromkeys(v for v in default if isinstance(v, str))) if name in MIXER_LISTS else []
    values = distinct if len(distinct) > 1 else list(default)
    return (values * n)[:n]


def tiny_config(model_type: str):
    """The family's config class filled with tiny sizes: SHRINK where the default has the attribute, then OVERRIDES."""
    from transformers import CONFIG_MAPPING

    default = _default_config(model_type)
    fields = default.to_dict()
    kwargs = {name: value for name, value in SHRINK.items() if name in fields}
    if "qk_rope_head_dim" in fields:  # multi-head latent attention: the rotary head is the rope part
        kwargs["head_dim"] = SHRINK["qk_rope_head_dim"]
        kwargs.pop("qk_head_dim", None)
    for name in PER_LAYER:
        if isinstance(fields.get(name), list):
            kwargs[name] = _per_layer(name, fields[name], LAYERS)
    if "mlp_layer_types" in fields and fields["mlp_layer_types"] is None:
        kwargs["mlp_layer_types"] = ["sparse"] * LAYERS  # read by the model, never filled in by the config
    kwargs.update(OVERRIDES.get(model_type, {}))
    with _quiet():
        config = CONFIG_MAPPING[model_type](**kwargs)
    return config


def count_moe_layers(model: torch.nn.Module, skip: tuple[str, ...] = ()) -> int:
    """How many MoE layers a built model holds.

    A module counts when it owns an experts bank as a direct child (named in EXPERT_BANK_NAMES,
    or any child whose class name ends in "Experts") holding more than one expert: a ModuleList /
    ModuleDict of >1 modules, or parameters stacked with a leading experts dimension (>=3-D, or
    DBRX's 2-D [E*F, D] banks, recognised by the owner's config). Mixture-of-attention blocks
    (class name contains "Attention" or "MoA") are not MoE FFN layers and are left out. Shared
    experts ("shared_expert(s)") are plain MLPs and never count. Modules whose dotted name has a
    part in `skip` are left out (UNREACHED: banks that token-only inputs never run).
    """
    count = 0
    for path, module in model.named_modules():
        owner = type(module).__name__
        if "Attention" in owner or "MoA" in owner or set(path.split(".")) & set(skip):
            continue
        if any(_is_expert_bank(name, child) for name, child in module.named_children()) or _has_embedding_experts(module):
            count += 1
    return count


def _has_embedding_experts(module: torch.nn.Module) -> bool:
    """Doge's CDMoE: its routed experts are rows of nn.Embedding tables (down_embed and up_embed), one row an expert.

    Two or more `*_embed` tables in a module whose class name says MoE; token embeddings
    (`embed_tokens`, a whole model's) never match the `_embed` suffix.
    """
    owner = type(module).__name__
    tables = [
        name for name, child in module.named_children()
        if isinstance(child, torch.nn.Embedding) and name.endswith("_embed") and child.num_embeddings > 1
    ]
    return ("MoE" in owner or "Moe" in owner) and len(tables) >= 2


def _is_expert_bank(name: str, child: torch.nn.Module) -> bool:
    cls = type(child).__name__
    if "shared" in name.lower():  # shared_experts: a dense MLP every token runs
        return False
    if name not in EXPERT_BANK_NAMES and not cls.endswith("Experts"):
        return False
    if isinstance(child, (torch.nn.ModuleList, torch.nn.ModuleDict)):
        return len(child) > 1
    return any(p.dim() >= 2 for p in child.parameters())


def model_class(config):
    """AutoModel's base model for the config, else the family's own base-model class.

    Some text sub-configs (e.g. qwen3_omni_moe_text, step3p5) have no AutoModel entry; their
    modeling module still defines a base model whose `config_class` is the config's class.
    """
    import importlib
    import inspect

    from transformers import AutoModel, PreTrainedModel
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    if type(config) in MODEL_MAPPING:
        return AutoModel
    package = type(config).__module__.rsplit(".", 1)[0]
    module = importlib.import_module(package + ".modeling_" + package.rsplit(".", 1)[1])
    candidates = [
        cls for name, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, PreTrainedModel) and cls.config_class is type(config)
        and name.endswith("Model") and "For" not in name and not name.endswith("PreTrainedModel")
    ]
    if not candidates:
        raise LookupError(f"no base model class for {type(config).__name__} in {module.__name__}")
    return min(candidates, key=lambda cls: len(cls.__name__))


def make_inputs(config, seed: int = 0) -> dict:
    """Token ids (batch 2, seq 6, in [1, vocab)) and a ones mask; decoder ids for encoder-decoders.

    EMBEDS_INPUT families get random inputs_embeds [2, 6, hidden] in place of the ids.
    """
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=generator)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if config.model_type in EMBEDS_INPUT:
        inputs["inputs_embeds"] = torch.randn(BATCH, SEQ, config.hidden_size, generator=generator)
        del inputs["input_ids"]
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids
    return inputs


def tiny_model(model_type: str, seed: int = 0):
    """(model, inputs, expected_moe_layers) for one family: float32, eval mode, random weights."""
    if model_type in UNBUILDABLE:
        raise NotImplementedError(f"{model_type}: {UNBUILDABLE[model_type]}")
    config = tiny_config(model_type)
    cls = model_class(config)
    torch.manual_seed(seed)
    with _quiet():
        model = cls.from_config(config, dtype=torch.float32) if cls.__name__ == "AutoModel" else cls._from_config(config, dtype=torch.float32)
    model = model.float().eval()
    with torch.no_grad():  # parameters a family's init leaves as torch.empty: small random values instead
        for param in model.parameters():
            if param.numel() and not (torch.isfinite(param).all() and param.abs().max() < 1e3):
                param.normal_(0.0, 0.02)
    return model, make_inputs(config, seed), count_moe_layers(model, UNREACHED.get(model_type, ()))
