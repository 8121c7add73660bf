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


def compile_kernel(kernel: str, config: dict, arch: int, dtype: str, cosine: bool, mask: bool,
                   heads: int = 3, window: int = 7, head_dim: int = 32, store_lse: bool = True) -> dict:
    """Compile one kernel variant for sm_<arch>; {"regs", "spill_bytes", "shared"} (spill_bytes is
    ptxas's per-thread stack, where spilled registers go). ``store_lse``: the forward as training
    runs it (True) or as inference does (False)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from swin.ops import triton_window as T

    fn = T._fwd_kernel if kernel == "fwd" else T._bwd_kernel
    n = window * window
    constexprs = dict(HEADS=heads, D=head_dim, WIN=window, N=n, BLOCK=max(16, triton.next_power_of_2(n)),
                      BLOCK_D=max(16, triton.next_power_of_2(head_dim)), HAS_MASK=mask, MASK_PAD=False,
                      IEEE=dtype == "fp32", COSINE=cosine)
    if kernel == "fwd":
        constexprs["STORE_LSE"] = store_lse
    pointers = {name: f"*{dtype}" for name in ("QKV", "O", "DO", "DQKV")}
    pointers.update({name: "*fp32" for name in ("BIAS", "SCALE", "LSE", "DBIAS", "DSCALE")})
    scalar = lambda name: "fp32" if name == "scale" else "i32"  # noqa: E731
    signature = {p.name: "constexpr" if p.name in constexprs else pointers.get(p.name, scalar(p.name))
                 for p in fn.params}
    compiled = triton.compile(ASTSource(fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", arch, 32),
                              options={k: v for k, v in config.items() if k in ("num_warps", "maxnreg")})
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    cubin = Path(os.environ.get("TMPDIR", "/tmp")) / f"swin_{kernel}_{os.getpid()}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    try:
        usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(cubin)], capture_output=True,
                               text=True, check=True).stdout
    finally:
        cubin.unlink()
    field = lambda name: int(re.search(rf"{name}:(\d+)", usage).group(1))  # noqa: E731
    return {"regs": field("REG"), "spill_bytes": field("STACK"), "shared": compiled.metadata.shared}


def table(arch: int) -> list[dict]:
    from swin.ops import triton_window as T

    rows = []
    # the forward as training runs it (log-sum-exp stored for the backward) and as inference does
    for kernel, store_lse, configs in (("fwd", True, T.FWD_CONFIGS), ("fwd", False, T.FWD_CONFIGS),
                                       ("bwd", True, T.BWD_CONFIGS)):
        seen = set()
        for config in configs:
            compiled_as = (config["num_warps"], config.get("maxnreg"))
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
                                         maxnreg=config.get("maxnreg") or "", dtype=dtype,
                                         version=2 if cosine else 1, shift_mask=mask, **r))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200, 80: A100)")
    args = p.parse_args(argv)
    rows = table(args.arch)
    print(f"sm_{args.arch}, Swin-T stage-1 shapes (3 heads, window 7, head dim 32)\n")
    print("| kernel | warps | maxnreg | dtype | V | shift mask | registers | spill bytes | shared bytes "
          "| programs per SM (registers) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        per_sm = 65536 // (32 * r["num_warps"] * ((r["regs"] + 7) // 8 * 8))
        print(f"| {r['kernel']} | {r['num_warps']} | {r['maxnreg']} | {r['dtype']} | {r['version']} | "
              f"{r['shift_mask']} | {r['regs']} | {r['spill_bytes']} | {r['shared']} | {per_sm} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
