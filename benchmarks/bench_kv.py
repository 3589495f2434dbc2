"""KV compression on SmolLM2-135M: payload size, codec speed and greedy fidelity per compression level.

    .venv/bin/python benchmarks/bench_kv.py [--model smollm2] [--num-tokens 64] [--threads 1] [--json PATH]

A thin table printer over `thunderserve.cli_bench_kv.bench_kv` (see its docstring for the definitions): every
prompt set of `PROMPT_SETS`, one row per compression and set. Targets (issue 4): int8 greedy-identical to the
uncompressed cache; int4 >= 90% free-running token agreement over 64 tokens and >= 3.5x fewer bytes than fp16.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from thunderserve.cli_bench_kv import bench_kv, format_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--num-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--storage-references", default="bf16,fp16",
                        help="plain 16-bit cache storage measured the same way, as a yardstick ('' for none)")
    parser.add_argument("--json", type=Path, default=None, help="also write the full result here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    refs = [r for r in args.storage_references.split(",") if r]
    result = bench_kv(model=args.model, num_tokens=args.num_tokens, storage_references=refs,
                      progress=lambda done, total, what: print(f"[{done}/{total}] {what}", file=sys.stderr))
    print(format_table(result))
    print(f"({time.perf_counter() - t0:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
