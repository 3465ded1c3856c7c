"""Settings of the router process (flags, then env, then defaults).

EXPERT_ADDRS lists the expert shards in shard order (comma-separated host:port); empty runs every expert inside the
router (one process, no shards: development only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from moemesh.serving.config import EXPERT_ADDRS, ConfigError, ServiceConfig, check_address, setting

DTYPES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "fp8", "int8", "int4")  # = moemesh.runtime.quant.QUANTIZATIONS (configs import no torch)
TRANSPORTS = ("auto", "cuda_ipc", "shm", "dist", "grpc")


@dataclass(frozen=True)
class RouterConfig(ServiceConfig):
    """The router: model backbone, KV cache, sampling; fans each MoE layer out to the expert shards."""

    SERVICE: ClassVar[str] = "router"

    port: int = setting(50054, "gRPC port (0: any free port)")
    model: str = setting("smollm2-moe", "model name (models registry) or checkpoint directory", env="MOEMESH_MODEL")
    expert_addrs: tuple[str, ...] = setting((), "expert shard addresses in shard order (empty: experts in process)",
                                            env=EXPERT_ADDRS)
    device: str = setting("cpu", "torch device of the backbone and KV cache (cpu, cuda, cuda:1)")
    dtype: str = setting("float32", "compute dtype", choices=DTYPES)
    kv_blocks: int | None = setting(None, "KV cache blocks (default: what kv_memory_mb buys)")
    kv_memory_mb: int | None = setting(None, "KV cache memory budget in MiB when kv_blocks is not set")
    block_size: int = setting(16, "tokens per KV block")
    max_context: int | None = setting(None, "longest sequence in tokens (default: the model's, capped by the cache)")
    expert_timeout: float = setting(30.0, "seconds one per-layer expert call may take")
    connect_timeout: float = setting(120.0, "seconds to wait at start for every expert shard to answer Info")
    compute_threads: int = setting(0, "torch intra-op threads (0: torch's default)")
    expert_transport: str = setting("auto", "expert data plane: auto (cuda_ipc when every shard shares the router's "
                                    "GPU, else shared memory for shards on this host, a "
                                    "torch.distributed group (gloo, or nccl on GPUs) for shards on other hosts, gRPC "
                                    "for shards that refuse either), shm or dist (every shard, or refuse to start), "
                                    "grpc", choices=TRANSPORTS)
    load_format: str = setting("auto", "weights: auto (the checkpoint's) or dummy (random from config.json, seeded per "
                               "tensor name: the shards must use dummy too)", choices=("auto", "dummy"))
    quantization: str = setting("none", "weight-only quantization of the experts run in process (or of a dense "
                                "model's FFN): none, fp8 (e4m3) or int8, per-channel scales, or int4 (a scale "
                                "per 128 columns)",
                                env="MOEMESH_QUANTIZATION", choices=QUANTIZATIONS)
    backend: str = setting("torch", "dense layers (and in-process experts): torch, onnxruntime (int4/int8 "
                           "MatMulNBits; float32 only) or packed (torch's int8/int4 CPU kernels)",
                           env="MOEMESH_BACKEND", choices=("torch", "onnxruntime", "packed"))
    kv_cache_dtype: str = setting("auto", "what the paged KV cache stores: auto (the model's dtype) or fp8 (e4m3, "
                                  "twice the tokens per byte; grouped-query attention models)",
                                  env="MOEMESH_KV_CACHE_DTYPE", choices=("auto", "fp8"))
    placement: str = setting("", "placement file from `moemesh placement` (expert replicas, per-layer expert "
                             "sets): the shards must host its entries in EXPERT_ADDRS order; replicated experts "
                             "split their tokens")
    dist_host: str = setting("", "host the expert shards reach this router's torch.distributed rendezvous at "
                             "(default: this machine's address on the route to each shard)")
    join_timeout: float = setting(10.0, "seconds a torch.distributed group may take to form (a shard that cannot "
                                  "reach the rendezvous fails start-up after this, naming it)")
    stall_timeout: float = setting(0.6, "seconds without a heartbeat from a shared-memory or process-group shard "
                                   "(data-plane heartbeats, or its Expert/Watch beats) before its step fails (a long "
                                   "step on a live shard keeps beating; services/router/stall_deadline.py)")
    seq_lease: float = setting(30.0, "seconds after which the KV cache of a sequence no batcher stepped is freed "
                               "(a dead batcher's sequences)")
    pingpong_min_seqs: int = setting(0, "steps of at least this many sequences split into two micro-batches whose "
                                     "router work and shard expert work overlap (ping-pong; remote shards over shm, "
                                     "grpc or cuda_ipc only); 0: off (the default: on the shared 2-core CPU it measured "
                                     "0.72-0.85x at 8-64 sequences, benchmarks/results/pingpong-cpu.md)")
    steps_ahead: bool = setting(True, "launch a pipelined decode step while the one before it still runs on the GPU "
                                "(in-process experts, plain sampling; services/router/steps_ahead.py)")
    prefix_cache: bool = setting(True, "share the KV blocks of equal prompt prefixes between sequences of one tenant "
                                 "(and cache_salt); idle cached blocks are evicted least recently used")

    def validate(self) -> None:
        super().validate()
        if not self.model:
            raise ConfigError(f"{self.source('model')}: empty model name")
        for addr in self.expert_addrs:
            check_address(addr, self.source("expert_addrs"))
        if len(set(self.expert_addrs)) != len(self.expert_addrs):
            raise ConfigError(f"{self.source('expert_addrs')}: {','.join(self.expert_addrs)!r} lists a shard twice")
        if not (self.device == "cpu" or self.device.startswith(("cuda", "mps"))):
            raise ConfigError(f"{self.source('device')}: {self.device!r} is not cpu, cuda[:N] or mps")
        for name in ("kv_blocks", "kv_memory_mb", "max_context"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{self.source(name)}: {value!r} must be >= 1")
        if self.block_size < 1:
            raise ConfigError(f"{self.source('block_size')}: {self.block_size!r} must be >= 1")
        for name in ("expert_timeout", "connect_timeout", "stall_timeout", "seq_lease", "join_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{self.source(name)}: {getattr(self, name)!r} must be > 0 seconds")
        if self.pingpong_min_seqs < 0:
            raise ConfigError(f"{self.source('pingpong_min_seqs')}: {self.pingpong_min_seqs!r} must be >= 0 (0: off)")
        if self.compute_threads < 0:
            raise ConfigError(f"{self.source('compute_threads')}: {self.compute_threads!r} must be >= 0")
