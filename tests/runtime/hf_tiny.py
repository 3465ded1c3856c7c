"""Tiny random checkpoints of every supported HF architecture, written by transformers itself (test-only import).

Each config exercises its family's particular paths: tied embeddings + llama3 rope (Llama), shared expert with
sigmoid gate + a dense layer + qkv bias (Qwen2-MoE), per-head q/k norm + explicit head_dim + norm_topk_prob
(Qwen3-MoE), full-projection q/k norm + active clip_qkv (OLMoE), MLA with q_lora + group-limited softmax routing +
a dense first layer (DeepSeek V2), MLA without q_lora + yarn + sigmoid routing with correction bias over 4 groups
(DeepSeek V3).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

# The runtime side of the parity tests runs here (MOEMESH_TEST_DEVICE=cuda on a GPU machine); references on CPU.
DEVICE = os.environ.get("MOEMESH_TEST_DEVICE", "cpu")

VOCAB = 256
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, initializer_range=0.05,
              max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _configs() -> dict:
    import transformers as tf

    mla = dict(kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, num_key_value_heads=4,
               moe_intermediate_size=32, intermediate_size=96, n_shared_experts=1, first_k_dense_replace=1)
    return {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(
            intermediate_size=96, num_key_value_heads=2, tie_word_embeddings=True,
            rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
        "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM, dict(
            intermediate_size=48, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)),
        "qwen2_moe": (tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM, dict(
            intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_key_value_heads=2,
            num_experts=4, num_experts_per_tok=2, mlp_only_layers=[0])),
        "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM, dict(
            intermediate_size=96, moe_intermediate_size=32, num_key_value_heads=2, head_dim=24, num_experts=8,
            num_experts_per_tok=2, norm_topk_prob=True)),
        "olmoe": (tf.OlmoeConfig, tf.OlmoeForCausalLM, dict(
            intermediate_size=32, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2, clip_qkv=0.3)),
        "deepseek_v2": (tf.DeepseekV2Config, tf.DeepseekV2ForCausalLM, dict(
            mla, q_lora_rank=24, n_routed_experts=8, num_experts_per_tok=2, topk_method="group_limited_greedy",
            n_group=2, topk_group=1, routed_scaling_factor=1.5)),
        "deepseek_v3": (tf.DeepseekV3Config, tf.DeepseekV3ForCausalLM, dict(
            mla, q_lora_rank=None, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
            routed_scaling_factor=2.5, norm_topk_prob=True,
            rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                             "original_max_position_embeddings": 64, "mscale": 1.0, "mscale_all_dim": 0.8})),
    }


ARCHS = ("llama", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3")


def build_model(arch: str, seed: int = 0):
    """The transformers model (float32, eager attention and experts: the exact reference), random weights."""
    config_cls, model_cls, extra = _configs()[arch]
    torch.manual_seed(seed)
    config = config_cls(**COMMON, **extra)
    model = model_cls(config)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # zeros by default: make the bias steer selection
                buffer.normal_(0, 0.05)
    return model.eval()


def save(model, out: Path, fused: bool = False) -> Path:
    """save_pretrained (per-expert tensors, as transformers 5 writes checkpoints), or with fused=True the model's
    in-memory state dict (fused 3D `mlp.experts.gate_up_proj` / `down_proj`) as one safetensors file."""
    if not fused:
        model.save_pretrained(out)
        return out
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tied = model.config.tie_word_embeddings
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight" or not tied}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def load_reference(path: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", experts_implementation="eager",
                                                 dtype=torch.float32)
    model.generation_config.eos_token_id = None  # never stop early: compare a fixed number of tokens
    return model.eval()


def reference_logits(model, token_ids: list[int]) -> torch.Tensor:
    """[L, V] float32 logits of one unpadded sequence."""
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].float()


def reference_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()
