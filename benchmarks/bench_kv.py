"""KV compression quality gate on SmolLM2-135M: perplexity, agreement, KL, bytes and codec speed per level.

    .venv/bin/python benchmarks/bench_kv.py [--model smollm2] [--num-docs 10] [--num-tokens 64] [--threads 2]
                                            [--json PATH]

A thin table printer over `thunderserve.quality.bench.bench_kv` (the same measurement as `thunderserve bench-kv`;
see its docstring): the fixed corpus (10 documents of 2,048 prompt + 128 continuation tokens), 24 chat prompts
decoded greedily, codec speed on a 2,048-token cache. Targets (issue 12): int8 passes the gate; a 4-bit scheme
passes with >= 3x fewer bytes than fp16 at 2,048-token prompts; the whole run takes < 10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from thunderserve.quality.bench import bench_kv, format_table
from thunderserve.quality.corpus import CorpusConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--num-docs", type=int, default=CorpusConfig().num_docs)
    parser.add_argument("--num-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--json", type=Path, default=None, help="also write the full result here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    result = bench_kv(model=args.model, num_tokens=args.num_tokens, corpus=CorpusConfig(num_docs=args.num_docs),
                      progress=lambda done, total, what: print(f"[{time.perf_counter() - t0:.0f} s] [{done}/{total}] "
                                                               f"{what}", file=sys.stderr))
    print(format_table(result))
    print(f"({time.perf_counter() - t0:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
