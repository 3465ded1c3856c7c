# Sourced at the start of every device call (see benchmarks/h200/README.md): the pure-Python wheels the device image
# lacks (carried in .whl/, git-ignored), installed into /tmp/site once per warm machine.
test -f /tmp/site/.done || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl && touch /tmp/site/.done; }
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
