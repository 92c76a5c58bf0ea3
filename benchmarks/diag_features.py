"""Where does a feature-map mixer's error come from on the GPU: the feature kernel or the chunk kernels?

For based's maps (power_features of degree 2) at several shapes, in bf16 on the GPU, this prints:
- ``feat``: power_features(x, pad=P) against power_features(x) (its first F columns, exactly; the rest 0);
- ``chunk``: chunk_normalised on the padded features against the unpadded ones (same bf16 inputs);
- ``err``/``err1``: each against chunk_normalised on fp32 copies of the unpadded features (the kernels'
  own error, no reference loop needed).

    python benchmarks/diag_features.py [--pad 16] [--shapes 1,1024,4,64 8,1024,16,64 ...]
"""

import argparse

import torch
from bench_chunked import rel  # (this script's folder is on the path)

from mixc.backends.chunked import chunk_normalised, power_features

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # (on a CPU: TRITON_INTERPRET=1)

DTYPE = torch.bfloat16 if DEV == "cuda" else torch.float16


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pad", type=int, default=16)
    ap.add_argument("--K", type=int, default=16)
    ap.add_argument("--shapes", nargs="+", default=["1,1024,4,64", "8,1024,4,64", "1,1024,16,64", "8,1024,16,64",
                                                    "4,4096,16,128", "1,4096,4,128"])
    args = ap.parse_args()
    K = args.K
    cq = (1.0, K ** -0.5, 0.5 / K)
    ck = (1.0, 1.0, 1.0)
    for s in args.shapes:
        B, T, H, V = map(int, s.split(","))
        gen = torch.Generator(device=DEV).manual_seed(1)
        q, k = (torch.randn(B, T, H, K, device=DEV, generator=gen).to(DTYPE) for _ in range(2))
        v = torch.randn(B, T, H, V, device=DEV, generator=gen).to(DTYPE)
        fq1, fk1 = power_features(q, 2, cq), power_features(k, 2, ck)
        fqp, fkp = power_features(q, 2, cq, pad=args.pad), power_features(k, 2, ck, pad=args.pad)
        F1 = fq1.shape[-1]
        feat = max((fqp[..., :F1] != fq1).sum().item(), (fkp[..., :F1] != fk1).sum().item())
        tail = max(fqp[..., F1:].abs().max().item() if fqp.shape[-1] > F1 else 0.0,
                   fkp[..., F1:].abs().max().item() if fkp.shape[-1] > F1 else 0.0)
        o1 = chunk_normalised(fq1, fk1, v)[0]
        op = chunk_normalised(fqp, fkp, v)[0]
        ref = chunk_normalised(fq1.float(), fk1.float(), v.float())[0]
        torch.cuda.synchronize() if DEV == "cuda" else None
        # where the padded output is wrong: per (batch, head) and per 64-token chunk
        d = (op.float() - ref).square().mean(-1)  # [B, T, H]
        n = ref.square().mean(-1).mean()
        bad_bh = (d.mean(1) / n > 1e-4).nonzero().tolist()[:8]
        bad_c = (d.view(B, T // 64, 64, H).mean((0, 2, 3)) / n > 1e-4).nonzero().flatten().tolist()[:16]
        print(f"B{B} T{T} H{H} V{V} F {F1}->{fqp.shape[-1]}: feat mismatches {feat}, pad max {tail:.1e}, "
              f"chunk pad vs 1 {rel(op, o1):.2e}, err pad {rel(op, ref):.2e}, err1 {rel(o1, ref):.2e}, "
              f"bad (b,h) {bad_bh}, bad chunks {bad_c}", flush=True)


if __name__ == "__main__":
    main()
