"""Tiny random-weight configurations of the HF models moeshard must handle (no downloads)."""

import torch
from transformers import (
    BertConfig,
    BertModel,
    MixtralConfig,
    MixtralModel,
    NllbMoeConfig,
    NllbMoeModel,
    OlmoeConfig,
    OlmoeModel,
    Qwen2MoeConfig,
    Qwen2MoeModel,
    Qwen3MoeConfig,
    Qwen3MoeModel,
    SwitchTransformersConfig,
    SwitchTransformersEncoderModel,
    T5Config,
    T5EncoderModel,
)

VOCAB = 64
DECODER_MOE = dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)


def switch(expert_capacity: int = 4, num_experts: int = 4) -> SwitchTransformersEncoderModel:
    cfg = SwitchTransformersConfig(
        vocab_size=VOCAB, d_model=16, d_ff=32, d_kv=4, num_heads=2, num_layers=4, num_sparse_encoder_layers=2,
        num_experts=num_experts, expert_capacity=expert_capacity,
    )
    return SwitchTransformersEncoderModel(cfg)


def nllb_moe() -> NllbMoeModel:
    cfg = NllbMoeConfig(
        vocab_size=VOCAB, d_model=16, encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, num_experts=4, encoder_sparse_step=1,
        decoder_sparse_step=2, max_position_embeddings=64,
    )
    return NllbMoeModel(cfg)


def mixtral(experts_implementation: str = "grouped_mm") -> MixtralModel:
    cfg = MixtralConfig(**DECODER_MOE, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)
    cfg._experts_implementation = experts_implementation
    return MixtralModel(cfg)


def qwen2_moe() -> Qwen2MoeModel:
    cfg = Qwen2MoeConfig(
        **DECODER_MOE, intermediate_size=32, moe_intermediate_size=8, shared_expert_intermediate_size=24,
        num_experts=6, num_experts_per_tok=2,
    )
    return Qwen2MoeModel(cfg)


def qwen3_moe() -> Qwen3MoeModel:
    cfg = Qwen3MoeConfig(
        **DECODER_MOE, intermediate_size=32, moe_intermediate_size=8, num_experts=8, num_experts_per_tok=3, head_dim=8,
    )
    return Qwen3MoeModel(cfg)


def olmoe() -> OlmoeModel:
    cfg = OlmoeConfig(**DECODER_MOE, intermediate_size=8, num_experts=8, num_experts_per_tok=2, eos_token_id=None)
    return OlmoeModel(cfg)


def bert() -> BertModel:
    return BertModel(BertConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2))


def t5() -> T5EncoderModel:
    return T5EncoderModel(T5Config(vocab_size=VOCAB, d_model=16, d_ff=32, d_kv=4, num_heads=2, num_layers=2))


def inputs(model, batch: int = 2, seq: int = 6, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, seq), generator=generator)
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if isinstance(model, NllbMoeModel):
        kwargs["decoder_input_ids"] = ids  # decoder prefill
    return kwargs
