"""Continuous batching vs one-at-a-time on SmolLM2-135M (CPU): wall time, speedup, identical greedy outputs.

    .venv/bin/python benchmarks/bench_engine_batching.py [--requests 16] [--max-tokens 48] [--threads 1]

Both runs use the same engine and `Generator`; the sequential run gives each request its own Generator, the
concurrent one adds all requests to one Generator (max batch = number of requests). Greedy, EOS respected.
The engine pads its token rows to a multiple of 4 so results do not depend on the batch (MKL uses other
kernels for 1-3 rows); that makes a lone sequence slower, so the sequential run is also timed on an engine
without padding (`row_multiple=1`), the fastest one-at-a-time baseline, and the speedup is given against both.
"""

from __future__ import annotations

import argparse
import time

import torch

from thunderserve.runtime.engine import Generator, SamplingParams, load_engine

QUESTIONS = [
    "What is the capital of France?", "Write a short poem about the ocean.", "Explain how a refrigerator works.",
    "Give me three tips for learning a new language.", "What are the main causes of climate change?",
    "Describe the water cycle in simple terms.", "How do I make a cup of green tea?",
    "Summarise the plot of Romeo and Juliet.", "Who wrote Hamlet?", "Why is the sky blue?",
    "Write a limerick about a cat.", "What is machine learning?", "How do airplanes fly?",
    "Give a recipe for pancakes.", "What is the tallest mountain on Earth?", "Explain photosynthesis briefly.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=48)
    # one thread by default: on a shared 2-core box, OpenMP spin-waiting makes 2-thread timings swing 5x
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = load_engine(args.model)
    prompts = [engine.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}])
               for i in range(args.requests)]
    params = SamplingParams(max_tokens=args.max_tokens)
    Generator(engine).generate(prompts[:2], params)  # warm-up (allocator, rope table, tokenizer)

    t0 = time.perf_counter()
    sequential = [Generator(engine).generate([p], params)[0] for p in prompts]
    t_seq = time.perf_counter() - t0

    t0 = time.perf_counter()
    concurrent = Generator(engine, max_batch_size=len(prompts)).generate(prompts, params)
    t_conc = time.perf_counter() - t0

    unpadded = load_engine(args.model, row_multiple=1)
    Generator(unpadded).generate(prompts[:1], params)
    t0 = time.perf_counter()
    fast_seq = [Generator(unpadded).generate([p], params)[0] for p in prompts]
    t_fast = time.perf_counter() - t0

    tokens = sum(len(o.token_ids) for o in concurrent)
    same = all(a.token_ids == b.token_ids and a.text == b.text for a, b in zip(sequential, concurrent, strict=True))
    same_fast = all(a.token_ids == b.token_ids for a, b in zip(fast_seq, concurrent, strict=True))
    print(f"model={args.model} requests={len(prompts)} max_tokens={args.max_tokens} "
          f"threads={torch.get_num_threads()} generated_tokens={tokens}")
    print(f"{'mode':<34}{'wall s':>10}{'tokens/s':>12}{'speedup':>10}{'identical':>11}")
    for name, t, ident in (("one after another (same engine)", t_seq, same),
                           ("one after another (unpadded rows)", t_fast, same_fast),
                           ("continuous batching", t_conc, True)):
        print(f"{name:<34}{t:>10.2f}{tokens / t:>12.1f}{t / t_conc:>9.2f}x{ident!s:>11}")
    print(f"speedup vs one after another: {t_seq / t_conc:.2f}x (vs the unpadded baseline {t_fast / t_conc:.2f}x); "
          f"outputs identical: {same}")


if __name__ == "__main__":
    main()
