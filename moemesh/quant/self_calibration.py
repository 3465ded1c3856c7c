"""Calibration text the model writes itself (data-free calibration): sampled answers to a fixed list of requests in
many registers (story, letter, explanation, news, dialogue, instructions, essay), so that GPTQ/AWQ see activations of
the model's own general-domain distribution instead of one small file, and no evaluation text is ever needed.

Why: GPTQ fits the layer Hessian of its calibration tokens. The shipped calib_en.txt is ~1.6k tokens, fewer than the
1536 inputs of SmolLM2's down projections, so that Hessian is rank-deficient and GPTQ overfits it (held-out output
error 2.3x round-to-nearest's on layer 5's down_proj); a narrow domain (Python docs) overfits too.
"""

from __future__ import annotations

from pathlib import Path

SUBJECTS = ("a lighthouse keeper", "the history of bread", "how volcanoes form", "a football match", "the moon landing",
            "a small village market", "how vaccines work", "an old clock", "the river Nile", "a chess tournament",
            "learning a new language", "the invention of the printing press", "a thunderstorm", "bees and flowers",
            "a train journey", "the first computers")
REQUESTS = ("Write a short story about {}.", "Write a news report about {}.", "Explain {} to a student.",
            "Write a letter to a friend about {}.", "Write an essay on {}.", "Write a dialogue between two people "
            "about {}.")


def requests() -> list[str]:
    """Every (request, subject) pair once; consecutive prompts differ in both. Prompt i pairs subject i mod S with
    request (i + i // S) mod R: for a fixed subject that request index steps by S + 1, and gcd(S + 1, R) = 1
    (17 and 6) makes the R prompts of each subject use R different requests."""
    n_s, n_r = len(SUBJECTS), len(REQUESTS)
    return [REQUESTS[(i + i // n_s) % n_r].format(SUBJECTS[i % n_s]) for i in range(n_s * n_r)]


def write_self_calibration(model_dir: Path, out: Path, sequences: int = 32, max_tokens: int = 256,
                           seed: int = 0) -> Path:
    """Samples `sequences` answers (temperature 0.8, top-p 0.95) and writes them, separated by blank lines, to `out`."""
    from moemesh.runtime.engine import Engine
    from moemesh.runtime.generate import generate
    from moemesh.runtime.types import SamplingParams
    from moemesh.tokenization.chat_tokenizer import ChatTokenizer

    tokenizer = ChatTokenizer.load(model_dir)
    engine = Engine.load(model_dir, kv_blocks=sequences * (max_tokens + 64) // 16 + 8)
    prompts = [tokenizer.encode_chat([{"role": "user", "content": r}])[0] for r in requests()[:sequences]]
    params = [SamplingParams(temperature=0.8, top_p=0.95, max_tokens=max_tokens, seed=seed + i)
              for i in range(len(prompts))]
    done = generate(engine, prompts, params, decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
    out.write_text("\n\n".join(c.text.strip() for c in done) + "\n", encoding="utf-8")
    return out
