"""Read a dense HF Llama directory into `TrainableLlama`, build the MoE student, write the MoE directory.

Written layout (architecture `MoemeshLlamaMoeForCausalLM`, agreed with moemesh.runtime): the Llama backbone keys
unchanged; per layer `model.layers.{i}.mlp.gate.weight` [E, H] (router),
`model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight` (moe_intermediate_size neurons each) and, when
shared_expert_intermediate_size > 0, `model.layers.{i}.mlp.shared_expert.{gate,up,down}_proj.weight`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from moemesh.convert.model import DenseFFN, LlamaShape, MoEFFN, TrainableLlama
from moemesh.convert.settings import ConvertSettings

ARCHITECTURE = "MoemeshLlamaMoeForCausalLM"
MODEL_TYPE = "moemesh_llama_moe"
MANIFEST = "moemesh_convert.json"  # settings + source fingerprint: the cache key of an output directory
# Copied beside the weights when the dense directory has them.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
              "vocab.json", "merges.txt", "chat_template.jinja")


@dataclass
class DenseCheckpoint:
    """A dense Llama directory loaded into memory: config.json, its shape and tensors under HF names."""

    path: Path
    config: dict[str, Any]
    shape: LlamaShape
    tensors: dict[str, torch.Tensor]

    @property
    def dtype(self) -> torch.dtype:
        return self.tensors["model.embed_tokens.weight"].dtype


@dataclass(frozen=True)
class LayerPartition:
    """One FFN's neurons: `shared` [S] always-on, `experts` [E, I] routed (every neuron exactly once overall)."""

    shared: torch.Tensor
    experts: torch.Tensor


def read_dense(path: str | Path) -> DenseCheckpoint:
    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"--model {str(path)!r}: no config.json (expected a Hugging Face model directory)")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    archs = config.get("architectures") or []
    if config.get("model_type") != "llama" and "LlamaForCausalLM" not in archs:
        raise ValueError(f"--model {str(path)!r}: architectures={archs} model_type={config.get('model_type')!r}; "
                         "conversion takes a dense LlamaForCausalLM checkpoint")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"--model {str(path)!r}: no *.safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(str(file)))
    return DenseCheckpoint(path=path, config=config, shape=LlamaShape.from_config(config), tensors=tensors)


def _local_state(tensors: dict[str, torch.Tensor], shape: LlamaShape) -> dict[str, torch.Tensor]:
    """HF names -> TrainableLlama names (drop the "model." prefix; a tied head has no lm_head)."""
    state = {}
    for name, tensor in tensors.items():
        if name == "lm_head.weight" and shape.tie_word_embeddings:
            continue
        state[name.removeprefix("model.")] = tensor
    return state


def build_dense(dense: DenseCheckpoint, dtype: torch.dtype = torch.float32) -> TrainableLlama:
    shape = dense.shape
    ffns = [DenseFFN(shape.hidden_size, shape.intermediate_size) for _ in range(shape.num_layers)]
    model = TrainableLlama(shape, ffns)
    model.load_state_dict(_local_state(dense.tensors, shape), strict=True)
    return model.to(dtype).eval().requires_grad_(False)


def build_moe(dense: DenseCheckpoint, partitions: list[LayerPartition], routers: list[torch.Tensor],
              settings: ConvertSettings, dtype: torch.dtype = torch.float32) -> TrainableLlama:
    """The MoE student: dense backbone, FFN neurons regrouped by `partitions`, routers [E, H] per layer."""
    shape = dense.shape
    per_expert = settings.check_ffn(shape.intermediate_size)
    ffns = [MoEFFN(shape.hidden_size, settings.experts, per_expert, settings.top_k, settings.shared_neurons,
                   settings.router_weighting) for _ in range(shape.num_layers)]
    model = TrainableLlama(shape, ffns)
    state = {k: v for k, v in _local_state(dense.tensors, shape).items() if ".mlp." not in k}
    for i, (part, router) in enumerate(zip(partitions, routers, strict=True)):
        gate, up, down = (dense.tensors[f"model.layers.{i}.mlp.{n}_proj.weight"] for n in ("gate", "up", "down"))
        order = part.experts.flatten()
        state[f"layers.{i}.mlp.router.weight"] = router
        state[f"layers.{i}.mlp.routed.gate_proj.weight"] = gate[order]
        state[f"layers.{i}.mlp.routed.up_proj.weight"] = up[order]
        state[f"layers.{i}.mlp.routed.down_proj.weight"] = down[:, order]
        if settings.shared_neurons:
            state[f"layers.{i}.mlp.shared.gate_proj.weight"] = gate[part.shared]
            state[f"layers.{i}.mlp.shared.up_proj.weight"] = up[part.shared]
            state[f"layers.{i}.mlp.shared.down_proj.weight"] = down[:, part.shared]
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.to(dtype).eval().requires_grad_(False)


def moe_tensors(model: TrainableLlama, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The MoE model's tensors under the written layout's names, contiguous, in `dtype`."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if ".mlp." not in name:
            out[name if name.startswith("lm_head") else f"model.{name}"] = tensor
    for i, layer in enumerate(model.layers):
        ffn: MoEFFN = layer.mlp
        prefix = f"model.layers.{i}.mlp"
        out[f"{prefix}.gate.weight"] = ffn.router.weight
        size = ffn.expert_inter
        for e in range(ffn.experts):
            rows = slice(e * size, (e + 1) * size)
            out[f"{prefix}.experts.{e}.gate_proj.weight"] = ffn.routed.gate_proj.weight[rows]
            out[f"{prefix}.experts.{e}.up_proj.weight"] = ffn.routed.up_proj.weight[rows]
            out[f"{prefix}.experts.{e}.down_proj.weight"] = ffn.routed.down_proj.weight[:, rows]
        if ffn.shared is not None:
            for proj in ("gate", "up", "down"):
                out[f"{prefix}.shared_expert.{proj}_proj.weight"] = getattr(ffn.shared, f"{proj}_proj").weight
    return {k: v.detach().to("cpu", dtype).contiguous() for k, v in out.items()}


def load_moe(path: str | Path, dtype: torch.dtype = torch.float32) -> TrainableLlama:
    """A written MoE directory back as a TrainableLlama (experts re-stacked in expert order)."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    if ARCHITECTURE not in (config.get("architectures") or []):
        raise ValueError(f"{path}: architectures={config.get('architectures')}, expected [{ARCHITECTURE!r}]")
    shape = LlamaShape.from_config(config)
    experts, inter = int(config["num_local_experts"]), int(config["moe_intermediate_size"])
    shared = int(config.get("shared_expert_intermediate_size") or 0)
    ffns = [MoEFFN(shape.hidden_size, experts, inter, int(config["num_experts_per_tok"]), shared,
                   config.get("router_weighting", "unit")) for _ in range(shape.num_layers)]
    model = TrainableLlama(shape, ffns)
    tensors = load_file(str(path / "model.safetensors"))
    state = {k: v for k, v in _local_state(tensors, shape).items() if ".mlp." not in k}
    for i in range(shape.num_layers):
        p = f"model.layers.{i}.mlp"
        state[f"layers.{i}.mlp.router.weight"] = tensors[f"{p}.gate.weight"]
        for proj, dim in (("gate", 0), ("up", 0), ("down", 1)):
            state[f"layers.{i}.mlp.routed.{proj}_proj.weight"] = torch.cat(
                [tensors[f"{p}.experts.{e}.{proj}_proj.weight"] for e in range(experts)], dim=dim)
            if shared:
                state[f"layers.{i}.mlp.shared.{proj}_proj.weight"] = tensors[f"{p}.shared_expert.{proj}_proj.weight"]
    model.load_state_dict(state, strict=True)
    return model.to(dtype).eval().requires_grad_(False)


def moe_config(dense: DenseCheckpoint, settings: ConvertSettings) -> dict[str, Any]:
    config = dict(dense.config)
    config.update({
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "num_local_experts": settings.experts,
        "num_experts_per_tok": settings.top_k,
        "moe_intermediate_size": settings.check_ffn(dense.shape.intermediate_size),
        "shared_expert_intermediate_size": settings.shared_neurons,
        "router_weighting": settings.router_weighting,
    })
    return config


def write_moe_dir(out: Path, dense: DenseCheckpoint, model: TrainableLlama, settings: ConvertSettings,
                  manifest: dict[str, Any]) -> None:
    """Write weights, config.json, the dense model's tokenizer/generation files and the conversion manifest."""
    out.mkdir(parents=True, exist_ok=True)
    save_file(moe_tensors(model, dense.dtype), str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out / "config.json", moe_config(dense, settings))
    for name in SIDE_FILES:
        if (dense.path / name).is_file():
            shutil.copyfile(dense.path / name, out / name)
    _write_json(out / MANIFEST, manifest)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
