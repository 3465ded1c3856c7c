"""int4/int8 weight-only quantization: methods (rtn, gptq, grid), calibration, and the checkpoint layouts
(compressed-tensors written; compressed-tensors, AutoAWQ and GPTQ read)."""
