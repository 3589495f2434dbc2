"""KV quantisation schemes: bytes against quality on the gate's corpus, one point per scheme (issue 12).

    .venv/bin/python benchmarks/bench_kv_schemes.py --from-json gate.json [--plot kv_schemes.png]
    .venv/bin/python benchmarks/bench_kv_schemes.py [--model smollm2] [--num-docs 10] [--threads 2] [--plot ...]

Reads a `thunderserve bench-kv --schemes all --json` result (or runs that measurement itself): every candidate of
`runtime.kv.schemes.SCHEMES` and the levels the runtime sends (`int8`, `int4`) scored on the same corpus
documents (`quality.perplexity`: prompt KV through the codec, continuation teacher-forced), with the 16-bit storage
yardsticks. Prints one row per scheme, most compressed first (bytes: fp16 over payload at 2,048- and 512-token
prompts, every byte counted), with the gate's verdict; `--plot` draws x fewer bytes (at 2,048 tokens) against the
perplexity change, with the gate's +1% line. `int4` is the passing 4-bit scheme with the most x fewer bytes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from thunderserve.quality.gate import GATE


def rows_of(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per scheme and level of a bench-kv result, most compressed (at 2,048 tokens) first."""
    rows = [{"name": name, **r} for name, r in result["levels"].items() if name != "none"]
    rows += [{"name": name, **r} for name, r in result.get("schemes", {}).items()]
    return sorted(rows, key=lambda r: -r["compression_ratio_vs_fp16"].get("2048", 0.0))


def table(result: dict[str, Any]) -> str:
    c = result["config"]["corpus"]
    lines = [GATE.describe(),
             f"corpus: {c['num_docs']} documents x ({c['prompt_tokens']} prompt + {c['continuation_tokens']} "
             f"continuation) tokens = {c['total_tokens']}; {c['scored_tokens']} scored; reference perplexity "
             f"{c['reference_perplexity']:.4f}",
             f"{'scheme':<20}{'x fewer @2048':>14}{'@512':>7}{'ppl':>9}{'d ppl %':>9}{'forced top-1':>13}"
             f"{'KL (nats)':>11}  gate"]
    for r in rows_of(result):
        ratios = r["compression_ratio_vs_fp16"]
        lines.append(f"{r['name']:<20}{ratios.get('2048', float('nan')):>14.2f}{ratios.get('512', float('nan')):>7.2f}"
                     f"{r['perplexity']:>9.4f}{100 * r['perplexity_delta_rel']:>+9.3f}"
                     f"{r['teacher_forced_agreement']:>13.4f}{r['kl_mean']:>11.5f}  "
                     f"{'pass' if r['passes_gate'] else 'FAIL'}")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for r in rows_of(result):
        x, y = r["compression_ratio_vs_fp16"].get("2048", 1.0), 100 * r["perplexity_delta_rel"]
        ax.scatter([x], [y], color="tab:green" if r["passes_gate"] else "tab:red", zorder=3,
                   marker="s" if r["name"] in result["levels"] else "o")
        ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axhline(100 * GATE.max_perplexity_delta_rel, color="grey", linestyle="--", label="gate: +1% perplexity")
    ax.axvline(3.0, color="grey", linestyle=":", label="3x fewer bytes than fp16")
    ax.set_xlabel("x fewer bytes than fp16 (2,048-token prompt, every byte counted)")
    ax.set_ylabel("perplexity change vs exact cache (%)")
    ax.set_title(f"KV schemes on {result['config']['model']} (green: passes the gate; squares: runtime levels)")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from-json", type=Path, default=None, help="a `bench-kv --schemes all --json` result")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--num-docs", type=int, default=10, help="corpus documents (the gate's budget: 10)")
    parser.add_argument("--num-tokens", type=int, default=64, help="greedy tokens per chat prompt")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--plot", type=Path, default=None, help="write the trade-off plot here (PNG)")
    parser.add_argument("--json", type=Path, default=None, help="write the measured result here")
    args = parser.parse_args()
    if args.from_json is not None:
        result = json.loads(args.from_json.read_text())
        if "schemes" not in result:
            sys.exit(f"error: {args.from_json}: no 'schemes' (run bench-kv with --schemes all)")
    else:
        import torch

        from thunderserve.quality.bench import bench_kv
        from thunderserve.quality.corpus import CorpusConfig
        from thunderserve.runtime.kv.schemes import LEVEL_SCHEMES, SCHEMES

        if args.threads:
            torch.set_num_threads(args.threads)
        candidates = [s for s in SCHEMES.values() if s not in LEVEL_SCHEMES.values()]
        result = bench_kv(args.model, corpus=CorpusConfig(num_docs=args.num_docs), num_tokens=args.num_tokens,
                          schemes=candidates,
                          progress=lambda done, total, what: print(f"[{done}/{total}] {what}", file=sys.stderr))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
    print(table(result))
    if args.plot:
        plot(result, args.plot)


if __name__ == "__main__":
    main()
