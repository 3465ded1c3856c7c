"""transformers' own generate() on the same random-weight model shape, for benchmarks/engine_gpu.py's table (the
reference beside moemesh in one run): config.json -> AutoModelForCausalLM.from_config on the GPU in bf16 with the
fastest experts backend (grouped_mm: torch._grouped_mm, FACTS.md) -> per batch, decode ms per step =
(generate(prompt, steps + 1 new tokens) - generate(prompt, 1 new token)) / steps, greedy, EOS ignored.
"""

from __future__ import annotations

import gc
import time

import torch


def load(config: dict, device: str = "cuda"):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**config)
    started = time.perf_counter()
    with torch.device(device):
        try:
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, experts_implementation="grouped_mm")
        except (TypeError, ValueError) as exc:  # a model or version without the experts interface
            print(f"transformers: experts_implementation=grouped_mm refused ({exc}); default experts", flush=True)
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    print(f"transformers: {config['num_hidden_layers']} layers built in {time.perf_counter() - started:.0f} s, "
          f"experts: {getattr(model.config, '_experts_implementation', None)}", flush=True)
    return model.eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _generate_s(model, ids: torch.Tensor, new: int) -> float:
    _sync(ids.device)
    started = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, pad_token_id=model.config.eos_token_id)
    _sync(ids.device)
    return time.perf_counter() - started


def decode_ms(model, batch: int, prompt: int, steps: int) -> float:
    """ms per decode step of `batch` sequences of `prompt` random tokens (one warm-up generate first)."""
    gen = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), generator=gen).to(model.device)
    _generate_s(model, ids, 2)  # warm-up: kernels, allocator
    first = _generate_s(model, ids, 1)
    return (_generate_s(model, ids, steps + 1) - first) / steps * 1e3


def rows(config: dict, label: str, batches: list[int], prompt: int, steps: int, roofline,
         device: str = "cuda") -> list[dict]:
    """Rows in engine_gpu.py's format (who = transformers); roofline(batch) -> ms. The model is freed at the end."""
    model = load(config, device)
    out = []
    for batch in batches:
        ms = decode_ms(model, batch, prompt, steps)
        out.append({"model": f"{label} (random weights)", "layers": config["num_hidden_layers"],
                    "who": "transformers", "quantization": "bf16", "batch": batch, "ms_per_step": round(ms, 2),
                    "tok_s": round(batch * 1e3 / ms, 1), "roofline_ms": round(roofline(batch), 2)})
        print(out[-1], flush=True)
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return out
