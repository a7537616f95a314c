"""Compile the GEMV kernel for a Hopper GPU (sm_90a) without one, and count what the compiled code does.

No GPU is needed: Triton lowers the kernel to PTX for the target, and the `ptxas` that ships with
triton assembles it, reporting registers and spills. For each configuration this prints and
records registers, spilled bytes, shared memory, and, inside the main loop (the first loop of
the PTX), the instructions, global loads, warp shuffles and barriers per thread per loop step,
with the codes each thread handles per step. These are static counts, not timings: they
say whether a change removed work from the loop, and catch a kernel the GPU compiler rejects,
before a GPU session is spent on it.

    python bench/compile_sm90.py                  # the GEMV at the issue-22 shapes' configurations
    python bench/compile_sm90.py --out DIR        # also keep the PTX files

Writes bench/results/kernels/compile_sm90.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for real

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from tacq_lite.core.pack import CODES_PER_WORD  # noqa: E402
from tacq_lite.kernels import gemv as G  # noqa: E402

DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
# (bits, M, x dtype, BLOCK_N, SPLIT_K, warps, kept weights): M = 1 and 16 at 3 bits, the format
CASES = [(3, 1, "float16", n, k, w, kept) for n, k, w in [(4, 1, 2), (8, 1, 2), (16, 1, 4), (16, 2, 4), (32, 1, 4)]
         for kept in (False, True)] + [
    (3, 1, "bfloat16", 16, 1, 4, True), (3, 16, "float16", 16, 1, 4, True), (3, 16, "bfloat16", 32, 1, 4, True),
    (3, 5, "float32", 16, 1, 4, True), (2, 1, "float16", 16, 1, 4, True), (4, 1, "float16", 16, 1, 4, True),
    (8, 16, "float16", 16, 1, 4, True)]


def ptxas() -> Path:
    folder = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    for name in ("ptxas-blackwell", "ptxas"):  # the newer one reads the PTX version triton 3.9 emits
        if (folder / name).is_file():
            return folder / name
    raise SystemExit(f"no ptxas in {folder}: this triton wheel cannot assemble for a GPU here.")


def compile_gemv(bits, M, dtype, block_n, split_k, warps, kept, groupsize=128):
    """The kernel as gemv() launches it for a [*, 4096] layer at `groupsize`, with 16-byte aligned pointers."""
    block_w = 1 << (G.segment_words(4096, bits, groupsize) - 1).bit_length()
    block_w = max(block_w, -(-16 // min(t for t in G.lane_tiles(bits) if t)))
    use_dot = M > 1
    x = DTYPES[dtype]
    sig = {"x_ptr": f"*{x}", "packed_ptr": "*i32", "scale_ptr": "*fp16", "zero_ptr": "*fp16", "row_ptr_ptr": "*i32",
           "col_idx_ptr": "*i16", "values_ptr": "*fp16", "y_ptr": "*fp32" if split_k > 1 else f"*{x}"}
    for name in ("M", "rows", "cols", "seg", "segs_per_split", "stride_xm", "stride_pr", "stride_sr", "stride_sg",
                 "stride_zr", "stride_zg", "stride_ym"):
        sig[name] = "i32"
    lanes_a, lanes_b = G.lane_tiles(bits)
    constexprs = dict(BITS=bits, PER_WORD=CODES_PER_WORD[bits], LANES_A=lanes_a, LANES_B=lanes_b, HAS_KEPT=kept,
                      ATOMIC=split_k > 1, USE_DOT=use_dot, DOT_FP32=dtype == "float32",
                      BLOCK_M=G.DOT_M if use_dot else 1, BLOCK_N=block_n, BLOCK_W=block_w, BLOCK_NNZ=16)
    if M == 1:  # triton specializes an int argument equal to 1
        constexprs["M"] = 1
    for name in constexprs:
        sig[name] = "constexpr"
    names = G._gemv_kernel.arg_names
    aligned = [["tt.divisibility", 16]]
    attrs = {(i,): aligned for i, n in enumerate(names) if sig[n].startswith("*") or n in ("rows", "cols")}
    src = ASTSource(G._gemv_kernel, sig, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))
    return kernel, dict(BLOCK_N=block_n, BLOCK_W=block_w, SPLIT_K=split_k, num_warps=warps)


def loop_counts(ptx: str) -> dict:
    """Per thread, in the first loop of the PTX (the loop over groups): instructions, loads, shuffles, barriers."""
    lines = ptx.splitlines()
    head = next((i for i, s in enumerate(lines) if "Loop Header" in s), None)
    if head is None:
        return {}
    label = lines[head].split(":")[0]
    end = next(i for i in range(head + 1, len(lines)) if re.search(rf"bra(\.uni)?\s+{re.escape(label)};", lines[i]))
    skip = ("//", "$", "{", "}", ".")
    body = [s.strip() for s in lines[head + 1:end] if s.strip() and not s.strip().startswith(skip)]
    return {"instructions": len(body), "global_loads": sum("ld.global" in s for s in body),
            "shuffles": sum("shfl" in s for s in body), "barriers": sum("bar.sync" in s for s in body)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="keep each case's PTX in this folder")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "kernels" / "compile_sm90.json")
    args = ap.parse_args(argv)
    assembler = ptxas()
    rows = []
    print("| bits | M | x | BLOCK_N x BLOCK_W | split | warps | kept | registers | spill B | loop instr "
          "| loop loads | loop shuffles | codes per thread-step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for bits, M, dtype, block_n, split_k, warps, kept in CASES:
            kernel, cfg = compile_gemv(bits, M, dtype, block_n, split_k, warps, kept)
            ptx = kernel.asm["ptx"]
            path = Path(tmp) / "k.ptx"
            path.write_text(ptx)
            done = subprocess.run([str(assembler), "-arch=sm_90a", "-v", str(path), "-o", str(Path(tmp) / "k.cubin")],
                                  capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"ptxas rejected {bits}-bit M={M} {dtype} {cfg}: {done.stderr.strip()[:500]}")
            out = done.stderr
            regs = int(re.search(r"Used (\d+) registers", out).group(1))
            spill = sum(int(b) for b in re.findall(r"(\d+) bytes spill stores", out))
            lanes = block_n * cfg["BLOCK_W"] * CODES_PER_WORD[bits] // (32 * warps)
            row = {"bits": bits, "M": M, "dtype": dtype, "kept": kept, **cfg, "registers": regs, "spill_bytes": spill,
                   "shared_bytes": kernel.metadata.shared, "loop": loop_counts(ptx), "codes_per_thread_step": lanes}
            rows.append(row)
            if args.out:
                args.out.mkdir(parents=True, exist_ok=True)
                name = f"gemv_b{bits}_m{M}_{dtype}_n{block_n}_k{split_k}_w{warps}_kept{int(kept)}.ptx"
                (args.out / name).write_text(ptx)
            lp = row["loop"]
            print(f"| {bits} | {M} | {dtype} | {block_n} x {cfg['BLOCK_W']} | {split_k} | {warps} | {kept} | {regs} "
                  f"| {spill} | {lp.get('instructions')} | {lp.get('global_loads')} | {lp.get('shuffles')} | {lanes} |")
    record = {"target": "sm_90a", "triton": triton.__version__, "layer_cols": 4096, "groupsize": 128, "cases": rows,
              "note": "static counts from the compiled PTX, per thread and loop step; not timings"}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
