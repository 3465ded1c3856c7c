"""Dense Llama -> MoE conversion: neuron clustering into experts, router calibration, optional distillation.

`convert(dense_dir, out_dir, ConvertSettings(...))` writes the `MoemeshLlamaMoeForCausalLM` layout the runtime
loads (see checkpoint.py); `convert_builtin_moe` is what the model registry calls for `smollm2-moe`.
"""

from moemesh.convert.builtin import convert_builtin_moe
from moemesh.convert.pipeline import convert
from moemesh.convert.settings import ConvertSettings

__all__ = ["ConvertSettings", "convert", "convert_builtin_moe"]
