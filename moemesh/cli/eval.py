"""`moemesh eval perplexity --model NAME|DIR --text FILE [--max-tokens N] [--window W] [--json]`."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="evaluate a model (perplexity on a text file)")
    sub = parser.add_subparsers(dest="eval_command", required=True, metavar="EVAL")
    ppl = sub.add_parser("perplexity", help="perplexity of a model on a UTF-8 text file")
    ppl.add_argument("--model", required=True,
                     help="built-in name (smollm2, smollm2-moe), checkpoint dir or HF repo id")
    ppl.add_argument("--text", required=True, help="UTF-8 text file (e.g. ../shared/eval/wikitext2-test.raw)")
    ppl.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens (default: all)")
    ppl.add_argument("--window", type=int, default=None,
                     help="tokens per window (default: one window of all scored tokens, up to the model's context)")
    ppl.add_argument("--batch", type=int, default=None, help="windows per forward (default: by logits memory)")
    ppl.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    ppl.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ppl.add_argument("--quantization", default="none", choices=["none", "fp8", "int8", "int4"],
                     help="weight-only quantization of the experts (a dense model: its FFN)")
    ppl.add_argument("--backend", default="torch", choices=["torch", "onnxruntime", "packed"],
                     help="onnxruntime: int4/int8 MatMulNBits (the checkpoint's, else int8 round-to-nearest); "
                     "packed: torch's int8/int4 CPU kernels (the checkpoint's int4 codes, else int8)")
    ppl.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"],
                     help="fp8: score K/V rounded as an e4m3 KV cache holds them")
    ppl.add_argument("--json", action="store_true", help="print one JSON object")
    ppl.set_defaults(func=run_perplexity)


def run_perplexity(ns: argparse.Namespace) -> int:
    from moemesh.evaluation.perplexity import evaluate_perplexity

    for name in ("max_tokens", "window", "batch"):
        value = getattr(ns, name)
        if value is not None and value < 1:
            print(f"error: --{name.replace('_', '-')} must be positive, got {value}", file=sys.stderr)
            return 2
    try:
        result = evaluate_perplexity(ns.model, ns.text, max_tokens=ns.max_tokens, window=ns.window, batch=ns.batch,
                                     device=ns.device, dtype=ns.dtype, progress=not ns.json,
                                     quantization=ns.quantization, backend=ns.backend,
                                     kv_cache_dtype=ns.kv_cache_dtype)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if ns.json:
        print(json.dumps(result.to_json(), indent=2))
        return 0
    print(f"model        {result.model} ({result.model_dir})")
    print(f"text         {result.text} ({result.text_tokens} tokens, sha256 {result.text_sha256[:12]})")
    print(f"scored       {result.tokens} tokens in {result.windows} window(s) of {result.window} "
          f"({result.predictions} predictions), max_tokens {result.max_tokens}")
    print(f"device       {result.device} {result.dtype}, quantization {result.quantization}, "
          f"KV cache {result.kv_cache_dtype}, {result.seconds:.1f}s")
    print(f"perplexity   {result.perplexity:.4f}  (mean NLL {result.mean_nll:.5f})")
    return 0
