"""The configs benchmarks/h200/prefill_tma.py sweeps (each kernel alone) and the whole-layer variants it puts beside
prefill_moe's defaults (gpu/prefill_moe.py documents each switch: EPI_SPLIT, PDL)."""

from __future__ import annotations

from moemesh.runtime.gpu import prefill_moe as pm

UP_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages", "FUSED_GU", "FLATTEN")
UP, DN = pm.DEFAULT_GATE_UP, pm.DEFAULT_DOWN
GATE_UP_GRID = [UP] + [dict(zip(UP_KEYS, v)) for v in (
    (128, 128, 64, 8, 8, 4, True, True), (128, 64, 64, 8, 8, 4, True, True),
    (128, 128, 64, 16, 8, 3, True, True), (128, 128, 128, 8, 8, 2, True, True), (128, 128, 64, 8, 8, 3, False, False),
    (128, 128, 64, 8, 8, 3, True, False), (64, 128, 64, 8, 4, 4, True, True), (64, 64, 64, 8, 4, 4, True, True),
    (64, 128, 64, 8, 4, 3, True, False), (64, 128, 64, 8, 8, 4, True, True), (64, 128, 64, 8, 4, 3, False, False))]
# EPI_SPLIT: the y tile stored in halves leaves room for a 4th stage at BN 256
SPLIT_DOWN = [{**DN, "EPI_SPLIT": True, "num_stages": 4}, {**DN, "EPI_SPLIT": True, "BLOCK_K": 128, "num_stages": 2},
              {**DN, "EPI_SPLIT": True, "BLOCK_N": 128, "BLOCK_K": 128, "num_stages": 3}]
DOWN_GRID = [dict(zip(UP_KEYS[:6] + ("FLATTEN",), v)) for v in (
    (128, 128, 64, 8, 8, 4, True), (128, 256, 64, 8, 8, 3, True), (128, 128, 128, 8, 8, 3, True),
    (128, 128, 64, 8, 4, 4, True), (128, 128, 64, 8, 8, 4, False), (64, 128, 64, 8, 4, 4, True),
    (64, 256, 64, 8, 4, 3, True), (64, 128, 128, 8, 4, 3, True), (64, 256, 64, 8, 8, 4, True))]
DOWN_GRID[2:2] = SPLIT_DOWN  # right after the first two (the old default, today's default)
# switch -> (gate_up changes, down changes)
SWITCHES = {"EPI_SPLIT": ({}, SPLIT_DOWN[0]), "PDL": ({"PDL": True}, {"PDL": True})}


def variant(name: str, up: dict = UP, dn: dict = DN) -> tuple[str, dict, dict]:
    """(name, gate_up config, down config): up and dn with the switches named in name ("A+B") set."""
    for switch in name.split("+"):
        more_up, more_dn = SWITCHES.get(switch, ({}, {}))
        up, dn = {**up, **more_up}, {**dn, **more_dn}
    return name, up, dn


# Whole-layer rows at the swept token count, the defaults first. Dropped after the H200 run of
# benchmarks/results/prefill-tma-h200-variants.md (1.4-1.6x slower than the defaults' 744 us): GATHER_A (gate_up
# gathering hidden's rows, 1,052 us) and BM64_WIDE (BM 64 x [64, 512] tiles, 1,019 us).
VARIANTS = [variant(n) for n in ("default", "EPI_SPLIT", "PDL", "EPI_SPLIT+PDL")]
