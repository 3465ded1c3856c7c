"""Inline PTX that widens narrow weight codes to fp16 in registers, for the swapped MoE GEMM (moe_swap.py), where the
weights are the tensor cores' register operand. Each conversion is elementwise (output i from input byte i), so it is
correct in any register layout Triton gives the operand; exact (every code is an fp16 integer).

    int8:  4 bytes -> 4 fp16 (I8_F16)          q + 128 under an fp16 high byte 0x64 = 1024 + q + 128; minus 1152
    int4:  4 bytes -> 4 low + 4 high nibbles   code under 0x64 (1024 + c; minus 1032) or shifted (1024 + 16 c;
           (I4_F16; quant.py's packing)        times 1/16 minus 72), i.e. code - 8 (symmetric)

Why int4 runs at ~55% of its HBM limit where fp8 reaches 80-88% (H200, Triton 3.6, Nsight Compute, gate_up at 64
tokens, int4 vs fp8): DRAM 52 vs 80% of peak, issue slots busy 62 vs 36%, 3.0x the warp instructions per weight byte
(the nibble conversion ~42% of int4's), occupancy 25 vs 19% (registers and shared memory): issue and latency bound.
"""

import triton.language as tl

# 4 int8 -> 4 fp16 (two words), ASM: each byte + 128 under an fp16 high byte 0x64 is 1024 + (q + 128), exactly;
# minus 1152 leaves q. One xor, two prmt, two f16x2 subtractions per four weights (Triton's int8 -> fp16 is one
# I2F per weight).
I8_F16 = tl.constexpr("""{
.reg .b32 a, h, c;
xor.b32 a, $2, 0x80808080;
mov.b32 h, 0x64646464;
mov.b32 c, 0x64806480;
prmt.b32 $0, a, h, 0x5140;
prmt.b32 $1, a, h, 0x5342;
sub.f16x2 $0, $0, c;
sub.f16x2 $1, $1, c;
}""")
# 4 bytes of symmetric int4 codes -> their 4 low and 4 high nibbles as fp16 code - 8 (two words each, INT4 + ASM). Two
# prmt spread the bytes over 16-bit lanes (bytes 0, 1 and 2, 3); per lane pair, one lop3 keeps the low nibbles under
# an fp16 high byte 0x64 (1024 + code; minus 1032), one the high ones (1024 + 16 code; times 1/16 minus 72: one fma,
# exact). Ten instructions per four bytes where shifting the word and masking each prmt's output took thirteen; the
# conversion stays elementwise (output i from byte i), so any register layout Triton gives the operand is correct.
# (Under Triton 3.6 the tensor-core operand holds four adjacent bytes per register, mma.sync kWidth 4; Triton 3.9's
# wgmma operand holds two, where two bytes per call (pack 2) avoids LLVM repacking bytes (sm_90 SASS of the K loop
# 530 -> 379 instructions there) but measured 1-12% slower on the H200 under 3.6, 386 instructions -> more.)
# Measured and dropped (H200, Triton 3.6, moe-swap-ab-int4-offsets-h200.json): six instructions per four bytes, the
# codes left as 1024 + c and 1024 + 16 c and the offsets taken off each token's dot per block from its activations'
# column sums computed in the K loop: 0.65-0.71x at 24-128 tokens (the sums' reductions and layout changes cost more
# than the four instructions saved; precomputed sums would need a launch per GEMM).
I4_F16 = tl.constexpr("""{
.reg .b32 z, m, c, s, o, p, q;
mov.b32 z, 0;
mov.b32 m, 0x64006400;
mov.b32 c, 0x64086408;
mov.b32 s, 0x2C002C00;
mov.b32 o, 0xD480D480;
prmt.b32 p, $4, z, 0x4140;
prmt.b32 q, $4, z, 0x4342;
lop3.b32 $0, p, 0x000F000F, m, 0xEA;
lop3.b32 $1, q, 0x000F000F, m, 0xEA;
lop3.b32 $2, p, 0x00F000F0, m, 0xEA;
lop3.b32 $3, q, 0x00F000F0, m, 0xEA;
sub.f16x2 $0, $0, c;
sub.f16x2 $1, $1, c;
fma.rn.f16x2 $2, $2, s, o;
fma.rn.f16x2 $3, $3, s, o;
}""")
