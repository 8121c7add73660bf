"""Registers, spills and shared memory of the Triton window-attention kernels, compiled for a GPU
architecture without a GPU (Triton's compiler and the ptxas it ships):

    PYTHONPATH=src python3 benchmarks/triton_resources.py            # sm_90 (H100/H200)
    PYTHONPATH=src python3 benchmarks/triton_resources.py --arch 80   # A100

The kernels are latency-bound, so registers per thread (how many programs an SM holds) are the
first thing a change to them moves; this is how stop 9 found the forward at 166 registers and
brought it to 120 with no GPU lent. Registers per SM: 65,536; a program of w warps and r registers
per thread takes 32 * w * r.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


# The integer arguments of a Swin-T stage-1 launch at batch 256 (56 x 56 map, window 7, 3 heads, C = 96;
# qkv (B, 56, 56, 288), output (B, 56, 56, 96)). Triton's launcher specialises every pointer that is
# 16-byte aligned and every integer divisible by 16 ("tt.divisibility" 16), and the compiler vectorises
# loads and pipelines loops only with that knowledge: compiled without it (stop 9), the kernels were
# not the ones the GPU runs (scalar 2-byte loads, 120 registers for what runs in 96).
STAGE1_ARGS = dict(nW=64, nWx=8, Hp=56, Wp=56, H=56, W=56, shift=3, total=256 * 64, sqb=56 * 56 * 288,
                   sqh=56 * 288, sqw=288, sob=56 * 56 * 96, soh=56 * 96, sow=96, C=96,
                   sxb=56 * 56 * 96, sxh=56 * 96, sxw=96, M=256 * 56 * 56, HID=384)


def compile_kernel(kernel: str, config: dict, arch: int, dtype: str, cosine: bool, mask: bool,
                   heads: int = 3, window: int = 7, head_dim: int = 32, store_lse: bool = True) -> dict:
    """Compile one kernel variant for sm_<arch> as the launcher would specialise it for Swin-T's first
    stage; {"regs", "spill_bytes", "shared", "async_copies", "vector_loads"} (spill_bytes is ptxas's
    per-thread stack, where spilled registers go; async_copies counts the loads the compiler
    pipelined; vector_loads the 128-bit global loads). ``store_lse``: the forward as training runs it
    (True) or as inference does (False)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from swin.ops import triton_window as T

    from swin.ops import triton_block as TB

    fn = {"fwd": T._fwd_kernel, "bwd": T._bwd_kernel, "block": TB._block_kernel, "mlp": TB._mlp_kernel}[kernel]
    n = window * window
    constexprs = dict(HEADS=heads, D=head_dim, WIN=window, N=n, BLOCK=max(16, triton.next_power_of_2(n)),
                      BLOCK_D=max(16, triton.next_power_of_2(head_dim)), HAS_MASK=mask, MASK_PAD=False,
                      IEEE=dtype == "fp32", COSINE=cosine)
    if kernel == "mlp":  # the fused MLP half: token tiles, no windows
        constexprs = dict(BLOCK_M=config["block_m"], BLOCK_C=max(16, triton.next_power_of_2(heads * head_dim)),
                          BLOCK_H=64, IEEE=dtype == "fp32", POST_NORM=cosine)
    if kernel == "fwd":
        constexprs.update(STORE_LSE=store_lse, LOOP="programs" in config, STAGES=config.get("stages", 2))
    if kernel == "block":  # the fused attention half of a block; x in fp32 (autocast), weights in dtype
        constexprs.update(BLOCK_C=max(16, triton.next_power_of_2(heads * head_dim)), POST_NORM=cosine,
                          HAS_QKV_BIAS=True)
    pointers = {name: f"*{dtype}" for name in ("QKV", "O", "DO", "DQKV", "QKV_W", "PROJ_W", "W1", "W2")}
    pointers.update({name: "*fp32" for name in ("BIAS", "SCALE", "LSE", "DBIAS", "DSCALE", "X", "OUT", "LN_W",
                                                 "LN_B", "QKV_B", "PROJ_B", "B1", "B2")})
    scalar = lambda name: "fp32" if name in ("scale", "eps") else "i32"  # noqa: E731
    signature = {p.name: "constexpr" if p.name in constexprs else pointers.get(p.name, scalar(p.name))
                 for p in fn.params}
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(fn.params) if p.name not in constexprs
             and (p.name in pointers or STAGE1_ARGS.get(p.name, 1) % 16 == 0)}
    compiled = triton.compile(ASTSource(fn, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32),
                              options={k: v for k, v in config.items() if k in ("num_warps", "maxnreg", "num_stages")})
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    cubin = Path(os.environ.get("TMPDIR", "/tmp")) / f"swin_{kernel}_{os.getpid()}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    try:
        usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(cubin)], capture_output=True,
                               text=True, check=True).stdout
    finally:
        cubin.unlink()
    field = lambda name: int(re.search(rf"{name}:(\d+)", usage).group(1))  # noqa: E731
    return {"regs": field("REG"), "spill_bytes": field("STACK"), "shared": compiled.metadata.shared,
            "async_copies": compiled.asm["ttgir"].count("async_copy_global_to_local"),
            "vector_loads": len(re.findall(r"ld\.global[.\w]*\.v4", compiled.asm["ptx"]))}


def table(arch: int) -> list[dict]:
    from swin.ops import triton_window as T

    rows = []
    # the forward as training runs it (log-sum-exp stored for the backward) and as inference does
    for kernel, store_lse, configs in (("fwd", True, T.FWD_CONFIGS), ("fwd", False, T.FWD_CONFIGS),
                                       ("bwd", True, T.BWD_CONFIGS)):
        seen = set()
        for config in configs:
            compiled_as = (config["num_warps"], config.get("maxnreg"), kernel == "fwd" and "programs" in config)
            if compiled_as in seen:  # the backward's program count is a launch size, not a compile
                continue
            seen.add(compiled_as)
            for dtype in ("bf16", "fp32"):
                for cosine in (False, True):
                    for mask in (False, True):
                        r = compile_kernel(kernel, config, arch, dtype, cosine, mask, store_lse=store_lse)
                        name = {("fwd", True): "fwd (training)", ("fwd", False): "fwd (inference)"}.get(
                            (kernel, store_lse), kernel)
                        rows.append(dict(kernel=name, num_warps=config["num_warps"],
                                         maxnreg=config.get("maxnreg") or "", walks="programs" in config,
                                         dtype=dtype,
                                         version=2 if cosine else 1, shift_mask=mask, **r))
    for heads, label in ((3, "Swin-T stage 1"), (4, "Swin-B stage 1")):
        from swin.ops import triton_block as TB

        for kind, configs in (("block", TB.BLOCK_CONFIGS), ("mlp", TB.MLP_CONFIGS)):
            for config in configs:
                for dtype in ("bf16", "fp32"):
                    for cosine in (False, True):
                        r = compile_kernel(kind, config, arch, dtype, cosine, True, heads=heads)
                        tile = f", {config['block_m']} tokens" if kind == "mlp" else ""
                        rows.append(dict(kernel=f"{kind} ({label}, {config['num_stages']} stages{tile})",
                                         num_warps=config["num_warps"], maxnreg="", walks=False, dtype=dtype,
                                         version=2 if cosine else 1, shift_mask=kind == "block", **r))
    return rows


def programs_per_sm(row: dict) -> int:
    """Programs an sm_90 SM holds at once: 65,536 registers (allocated per warp in units of 8 per
    thread) and 228 KB of shared memory (1 KB of it reserved per program)."""
    by_regs = 65536 // (32 * row["num_warps"] * ((row["regs"] + 7) // 8 * 8))
    by_shared = 233472 // (row["shared"] + 1024)
    return min(by_regs, by_shared)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200, 80: A100)")
    args = p.parse_args(argv)
    rows = table(args.arch)
    print(f"sm_{args.arch}, Swin-T stage-1 shapes (3 heads, window 7, head dim 32)\n")
    print("| kernel | warps | maxnreg | walks windows | dtype | V | shift mask | registers | spill bytes "
          "| shared bytes | pipelined loads | 128-bit loads | programs per SM |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kernel']} | {r['num_warps']} | {r['maxnreg']} | {'yes' if r['walks'] else ''} | {r['dtype']} "
              f"| {r['version']} | {r['shift_mask']} | {r['regs']} | {r['spill_bytes']} | {r['shared']} "
              f"| {r['async_copies']} | {r['vector_loads']} | {programs_per_sm(r)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
