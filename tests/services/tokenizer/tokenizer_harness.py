"""Constants shared by the tokenizer tests (conftest.py modules must not be imported by name)."""

MODEL = "tiny"  # the model id the test catalog serves
