# Sourced at the start of every device call (see benchmarks/h200/README.md): the pure-Python wheels the device image
# lacks (carried in .whl/, git-ignored), installed into /tmp/site once per warm machine and wheel list.
# (again when .whl/ holds other wheels than the machine installed: the marker names the list)
MARK=/tmp/site/.done-$(ls .whl | md5sum | cut -c1-12)
test -f $MARK || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl && touch $MARK; }
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
test -d .whl/smollm2-tokenizer && export MOEMESH_TOKENIZER_DIR=$PWD/.whl/smollm2-tokenizer
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
