"""Plain dataclasses exchanged between the runtime and the services (the servicers translate protobuf to these).

    batcher --StepRequest--> router servicer --list[SequenceWork]--> Engine.step --> list[SequenceResult]
                                                   |
                       Backbone forward, per MoE layer:  dispatch.submit(layer, hidden, ids, weights) ... collect()
                                                   |   (LocalDispatch in-process, or the router's gRPC fan-out)
                                                   v
                                 ExpertBank.forward on each shard --> partial [T, H], summed by the router
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # annotations only: the gateway and batcher use these dataclasses without loading torch
    import torch


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen; defaults are greedy with no penalties (mirrors moemesh.v1.SamplingParams)."""

    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # 1: off
    top_k: int = 0  # 0: off
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    repetition_penalty: float = 1.0  # HF semantics over prompt + completion tokens; 1: off
    guided: Guided | None = None  # grammar the output must match (runtime/grammar.py)
    prompt_tokens: int | None = None  # tokens of the prompt; later fed tokens are replayed into state (recompute)
    prompt_logprobs: int | None = None  # score the prompt's tokens with this many alternatives (prompt_logprobs.py)


@dataclass(frozen=True)
class Guided:
    """Constrained decoding (mirrors moemesh.v1.GuidedDecoding): a JSON Schema text, or any JSON object."""

    json_schema: str = ""
    json_object: bool = False


@dataclass
class SequenceWork:
    """One sequence's share of a step: a prefill chunk or one decode token."""

    seq_id: str
    token_ids: list[int]
    position: int  # tokens of this sequence already in the KV cache; 0 starts the sequence
    sampling: SamplingParams | None = field(default_factory=SamplingParams)  # None: the ones it started with
    sample: bool = True  # False for prefill chunks that are not the prompt's last
    salt: str = ""  # prefix-cache namespace (tenant + client cache_salt): blocks are shared only within one salt
    # token_ids empty: feed the token the engine sampled for this sequence in its last step (step pipelining)
    follows: bool = False


@dataclass
class SequenceResult:
    """What a step produced for one sequence."""

    seq_id: str
    token_id: int | None  # None when the work did not sample
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    cached_tokens: int = 0  # tokens of this work found in the prefix cache (not computed)
    prompt_logprobs: list = field(default_factory=list)  # runtime/prompt_logprobs.PromptLogprob per prompt token fed


@dataclass(frozen=True)
class ExpertPlacement:
    """Which routed experts a shard hosts (same expert ids in every hosted layer)."""

    address: str
    layers: tuple[int, ...]
    experts: tuple[int, ...]


class ExpertDispatch(Protocol):
    """Runs one MoE layer's routed experts for a block of tokens, wherever they live: the seam between the backbone
    (attention, gates, shared experts) and the expert data plane (in process, shared memory, CUDA IPC, NCCL, gRPC).

    hidden: [T, H] compute dtype; topk_ids: [T, K] int64 global expert ids (-1: unused slot);
    topk_weights: [T, K] float32. The result is [T, H]: sum_k weight[t, k] * expert_{ids[t, k]}(hidden[t]).

    Per MoE layer the backbone calls `submit` (starts the routed experts: must not block on them and must not
    synchronize the host with the device), runs the shared expert meanwhile, then `collect`. Per step the engine calls
    `begin_step(tokens)` before the forward (T of every layer of this step; a transport sizes or picks its
    preallocated buffers here, once per step) and `end_step()` after it, also when the forward raised.
    `__call__(...)` is `collect(submit(...))`, for callers without overlap.
    """

    def begin_step(self, tokens: int) -> None: ...

    def submit(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> object: ...

    def collect(self, handle: object) -> torch.Tensor: ...

    def end_step(self) -> None: ...

    def __call__(
        self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor: ...


class CapacityError(RuntimeError):
    """The KV cache cannot hold the step; nothing of the step was applied."""


class SequenceStateError(ValueError):
    """A SequenceWork's position does not match the cached length, or the sequence is unknown."""


class ContextLengthError(SequenceStateError):
    """A sequence would grow past the engine's max_context (a client error, like SequenceStateError)."""


@dataclass(frozen=True)
class EngineInfo:
    """What the router reports about its model and KV cache (mirrors moemesh.v1.RouterInfo)."""

    model: str
    architecture: str
    max_context: int
    kv_block_size: int
    kv_blocks_total: int
    kv_blocks_free: int
    active_sequences: int
    vocab_size: int
    num_layers: int
    num_experts: int  # routed experts per MoE layer; 0 for a dense model
    experts_per_token: int
    moe_layers: tuple[int, ...]  # decoder layers that have routed experts
    eos_token_ids: tuple[int, ...]
    device: str
    dtype: str
    cuda_graphs: str = "off: not a CUDA engine"  # "on: ..." or "off: <why>" (decode steps replayed as CUDA graphs)
    quantization: str = "none"  # weight-only quantization of the in-process experts / dense FFN: none, fp8, int8
    backend: str = "torch"  # runtime of the dense layers and in-process experts: torch or onnxruntime
    prefix_cache: bool = False  # full KV blocks shared between sequences of one salt
    kv_blocks_cached: int = 0  # idle blocks kept for their prefix (also counted in kv_blocks_free)
    kv_blocks_evicted: int = 0  # cached blocks evicted since start
    kv_cache_dtype: str = ""  # what the KV pools hold: "fp8" (e4m3) or the model's dtype ("" from older routers)
