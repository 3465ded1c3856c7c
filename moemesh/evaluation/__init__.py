"""Model evaluation: perplexity on held-out text through the serving runtime."""

from moemesh.evaluation.perplexity import PerplexityResult, evaluate_perplexity

__all__ = ["PerplexityResult", "evaluate_perplexity"]
