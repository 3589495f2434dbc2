"""KV compression on SmolLM2-135M: payload size, codec speed and greedy fidelity per compression level.

    .venv/bin/python benchmarks/bench_kv.py [--model smollm2] [--num-tokens 64] [--threads 1]

A thin table printer over `thunderserve.cli_bench_kv.bench_kv` (see its docstring for the definitions).
Targets: int8 greedy-identical to the uncompressed cache; int4 >= 90% token agreement and >= 3.5x fewer bytes
than fp16.
"""

from __future__ import annotations

import argparse
import time

import torch

from thunderserve.cli_bench_kv import COMPRESSIONS, bench_kv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--num-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    result = bench_kv(model=args.model, num_tokens=args.num_tokens)
    cfg = result["config"]
    print(f"model={cfg['model']} prompts={cfg['num_prompts']} tokens/prompt={cfg['num_tokens']} "
          f"kv dtype={cfg['kv_dtype']} group={cfg['group_size']} ({time.perf_counter() - t0:.0f} s)")
    print(f"{'compression':<12}{'x fewer bytes':>14}{'quant GB/s':>12}{'dequant GB/s':>14}{'agreement':>11}"
          f"{'forced':>9}{'max |dlogit|':>14}")
    for c in COMPRESSIONS:
        r = result[c]
        print(f"{c:<12}{r['compression_ratio_vs_fp16']:>14.2f}{r['quantize_gbps']:>12.2f}"
              f"{r['dequantize_gbps']:>14.2f}{r['token_agreement']:>11.3f}"
              f"{r['token_agreement_teacher_forced']:>9.3f}{r['max_logit_error']:>14.4f}")


if __name__ == "__main__":
    main()
