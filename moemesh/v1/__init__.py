"""Generated from protos/moemesh/v1 by `make protos`; do not edit."""
