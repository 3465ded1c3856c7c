#!/usr/bin/env bash
# The quality sweep on the lent GPU (device tool), in two calls on one warm machine, because the built-in GGUF
# (94 MiB) is larger than what one call may carry (64 MiB):
#   bash benchmarks/device_sweep.sh stash            carry .devA: first 50 MiB of the GGUF + gguf wheel + eval ids;
#                                                    kept in /tmp, then a tiny smoke sweep on the GPU
#   bash benchmarks/device_sweep.sh sweep [ARGS]     carry .devB: the rest; reassemble, check sha256, full sweep
# .devA/.devB are made by `python benchmarks/quality.py device-files`. Results land in $OUT (sweep.json, sweep.log).
set -uo pipefail
STASH=/tmp/moemesh_stash
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
export PYTHONUNBUFFERED=1
install_gguf() { test -d /tmp/site/gguf || python3 -m pip install -q --no-index --no-deps --target /tmp/site "$1"/gguf-*.whl; }
case "$1" in
stash)
  mkdir -p $STASH && cp .devA/* $STASH/ && ls -la $STASH
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, tokenizers, jinja2; print(torch.__version__, transformers.__version__, tokenizers.__version__, torch.cuda.get_device_name())"
  install_gguf $STASH
  PYTHONPATH=/tmp/site:. python3 benchmarks/quality_sweep.py --tiny --device cuda --out "$OUT/tiny.json" \
    --time-budget 10 --calib-tokens 512 --distill-tokens 8192 --seq-len 64 --probe-steps 20 --probe-lrs 1e-3 3e-3 \
    2>&1 | grep -v "distill step" | tail -30
  ;;
sweep)
  test -f $STASH/gguf.partA || { echo "no stash: not the warm machine of the stash call"; exit 3; }
  cat $STASH/gguf.partA .devB/gguf.partB > /tmp/smollm2.gguf
  echo "$SHA  /tmp/smollm2.gguf" | sha256sum -c - || exit 4
  install_gguf .devB
  export PYTHONPATH=/tmp/site:. MOEMESH_BUILTIN_GGUF=/tmp/smollm2.gguf MOEMESH_HOME=/tmp/mhome MOEMESH_MODELS=/tmp/mhome/models
  python3 benchmarks/quality_sweep.py --device cuda --eval-ids .devB/eval_ids.pt --out "$OUT/sweep.json" "${@:2}" \
    2>&1 | tee "$OUT/sweep.log" | grep -v "distill step"
  ;;
*) echo "usage: $0 stash|sweep [sweep args]"; exit 2 ;;
esac
