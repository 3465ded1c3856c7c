"""A random-weight Qwen3-MoE checkpoint of a chosen size, written where it runs (no weights travel to the GPU).

Defaults are Qwen3-30B-A3B's shape (hidden 2048, 32 heads / 4 KV heads of 128, 128 experts top-8, expert FFN 768,
vocab 151936) with 8 layers instead of 48: about 5.4 B parameters, 11 GB in bfloat16. Weights come from
transformers' own initialisation (normal, std 0.02), built on `--device` so that a GPU makes them in seconds. No
tokenizer: the batching benchmark sends token ids.

    python3 benchmarks/random_moe.py /tmp/qwen3moe-8l --device cuda                    # on the lent GPU
    .venv/bin/python benchmarks/random_moe.py /tmp/q3tiny --layers 2 --hidden 64 --heads 4 --kv-heads 2 \
        --head-dim 16 --experts 8 --top-k 2 --moe-intermediate 32 --vocab 49152           # a CPU rehearsal
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--moe-intermediate", type=int, default=768)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--device", default="cpu", help="where the weights are initialised (cuda: seconds)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    started = time.perf_counter()
    config = Qwen3MoeConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
        num_experts=args.experts, num_experts_per_tok=args.top_k, moe_intermediate_size=args.moe_intermediate,
        intermediate_size=6144, norm_topk_prob=True, max_position_embeddings=40960, tie_word_embeddings=False,
        rms_norm_eps=1e-6, bos_token_id=min(151643, args.vocab - 1), eos_token_id=min(151645, args.vocab - 1),
    )
    torch.manual_seed(args.seed)
    with torch.device(args.device), torch.no_grad():
        model = Qwen3MoeForCausalLM(config).to(torch.bfloat16).eval()
        for param in model.parameters():  # explicit, whatever the transformers version's init does
            param.fill_(1.0) if param.dim() == 1 else param.normal_(0.0, 0.02)  # 1-D: the RMSNorm weights
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(args.out)
    summary = {"dir": str(args.out), "params": params, "bytes_bf16": 2 * params,
               "seconds": round(time.perf_counter() - started, 1),
               **{k: v for k, v in vars(args).items() if k != "out"}}
    (args.out / "random_moe.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
