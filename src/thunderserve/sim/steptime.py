"""Step latencies of a group as the simulator sees them, built on the cost model's per-stage roofline.

* Prefill batch: per-stage times (the pipeline is tracked stage by stage, so with PP a new batch enters the
  first stage as soon as the bottleneck stage would accept it; see `replay`).
* Decode step with PP > 1: the running batch is split into m = min(pp, batch) micro-batches that circulate
  through the pipeline, so every sequence gets one token per max(L, m x B), where L is the full pipeline
  latency of one micro-batch and B its bottleneck-stage time (vLLM/DistServe-style pipelined decoding).
* Mixed (colocated, chunked-prefill) step: one pass over decode tokens and prefill chunks together, priced by
  the cost model's `StagePerf.step_time_s` (the sum of its per-operation parts); it equals `prefill_time_s` with
  no decodes and `decode_time_s` with no chunks (pinned by tests).
"""

from __future__ import annotations

from collections.abc import Sequence

from thunderserve.costmodel.comm import send_time_s
from thunderserve.costmodel.perf import GroupPerf, StagePerf


def mixed_stage_time_s(stage: StagePerf, decode_batch: float, decode_context_tokens: float,
                       chunk_tokens: float, chunk_attn_sq_tokens: float, chunk_prefix_tokens: float,
                       chunk_seqs_completing: float) -> float:
    """One stage pass over `decode_batch` decode tokens (holding `decode_context_tokens` of KV) plus prefill
    chunks of `chunk_tokens` in all: `StagePerf.step_time_s`, the sum of the parts.

    `chunk_attn_sq_tokens` = Σ(c² + 2·c·done) for chunks of c tokens after `done` already-prefilled tokens
    (causal attention to the own chunk and the prefix, whose KV reads the attention term covers);
    `chunk_prefix_tokens` = Σdone (kept for callers; priced inside the attention term);
    `chunk_seqs_completing`: chunks that end their prompt (these need logits, like decode tokens).
    """
    del chunk_prefix_tokens
    return stage.step_time_s(decode_batch, decode_context_tokens, chunk_tokens, chunk_attn_sq_tokens,
                             decode_batch + chunk_seqs_completing)


class GroupTimer:
    """Latencies of one group's batches and steps (units: seconds, tokens)."""

    def __init__(self, perf: GroupPerf) -> None:
        self.perf = perf
        self.stages = perf.stages
        self.pp = len(perf.stages)
        self.send_bytes_s = perf.send_bytes_s

    def _sends_s(self, tokens: float) -> list[float]:
        return [send_time_s(tokens * s.hidden_bytes_per_token, bw)
                for s, bw in zip(self.stages, self.send_bytes_s, strict=False)]

    def prefill_stage_times_s(self, total_tokens: float, sum_sq_tokens: float, num_seqs: float
                              ) -> tuple[list[float], list[float]]:
        """(time in each stage, send time after each stage but the last) of one prefill batch."""
        stage = [s.prefill_time_s(total_tokens, sum_sq_tokens, num_seqs) for s in self.stages]
        return stage, self._sends_s(total_tokens)

    def decode_step_s(self, batch: int, context_tokens: float) -> float:
        """Time between two tokens of every running sequence (see module docstring for PP)."""
        if self.pp == 1:
            return self.perf.decode_time_s(batch, context_tokens)
        m = min(self.pp, batch)
        b, c = batch / m, context_tokens / m
        times = [s.decode_time_s(b, c) for s in self.stages]
        latency = sum(times) + sum(self._sends_s(b))
        return max(latency, m * max(times))

    def mixed_step_s(self, decode_batch: int, context_tokens: float, chunks: Sequence[int],
                     done: Sequence[int], completing: int) -> float:
        """Time of one colocated step: decodes plus prefill chunks (PP handled as for decode steps)."""
        chunk_tokens = float(sum(chunks))
        attn_sq = float(sum(c * c + 2 * c * d for c, d in zip(chunks, done, strict=True)))
        prefix = float(sum(done))
        if self.pp == 1:
            return mixed_stage_time_s(self.stages[0], decode_batch, context_tokens, chunk_tokens, attn_sq,
                                      prefix, completing)
        seqs = decode_batch + len(chunks)
        m = max(min(self.pp, seqs), 1)
        times = [mixed_stage_time_s(s, decode_batch / m, context_tokens / m, chunk_tokens / m, attn_sq / m,
                                    prefix / m, completing / m) for s in self.stages]
        latency = sum(times) + sum(self._sends_s((decode_batch + chunk_tokens) / m))
        return max(latency, m * max(times))
