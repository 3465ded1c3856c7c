"""What Router.Info and /v1/models say about a checkpoint's quantization (moemesh.quant.describe), from config.json."""

from __future__ import annotations

import json
from pathlib import Path


from moemesh.quant.describe import describe_checkpoint, describe_config
from moemesh.quant.writer import quantization_config


def test_compressed_tensors_written_by_moemesh_names_bits_method_and_group() -> None:
    config = {"quantization_config": quantization_config({4: ["a"], 8: ["b"]}, 32, False),
              "moemesh_quantization": {"method": "gptq"}}
    assert describe_config(config) == "int4+int8 gptq group 32 (compressed-tensors)"
    config["quantization_config"] = quantization_config({8: ["b"]}, 64, True)
    del config["moemesh_quantization"]
    assert describe_config(config) == "int8 group 64 (compressed-tensors)"


def test_awq_gptq_fp8_and_float_checkpoints() -> None:
    assert describe_config({"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128}}) == \
        "int4 awq group 128 (awq)"
    assert describe_config({"quantization_config": {"quant_method": "gptq", "bits": 8, "group_size": -1}}) == \
        "int8 gptq (gptq)"
    assert describe_config({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}) == \
        "fp8 block 128x128"
    assert describe_config({"architectures": ["LlamaForCausalLM"]}) == "none"


def test_a_directory_is_read_and_anything_else_is_none(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": quantization_config({4: ["x"]}, 16,
                                                                                                  True)}))
    assert describe_checkpoint(tmp_path) == "int4 group 16 (compressed-tensors)"
    assert describe_checkpoint(tmp_path / "missing") == "none"
    assert describe_checkpoint("HuggingFaceTB/SmolLM2-135M") == "none"
