"""Trace CSV layouts (Vidur/Splitwise, Azure 2023/2024, BurstGPT) and bad-row reporting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from thunderserve.errors import SpecError
from thunderserve.spec.workload import load_workload, read_trace


def write(tmp_path: Path, text: str, name: str = "t.csv") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_vidur_arrived_at_layout(tmp_path: Path) -> None:
    w = read_trace(write(tmp_path, "arrived_at,num_prefill_tokens,num_decode_tokens\n0.5,100,10\n1.5,200,20\n"))
    assert w.name == "t"
    assert w.arrival_times_s.tolist() == [0.0, 1.0]
    assert w.prompt_tokens.tolist() == [100, 200] and w.output_tokens.tolist() == [10, 20]
    assert w.trace_rate_rps == pytest.approx(2.0)


def test_azure_2023_layout_with_seven_fractional_digits(tmp_path: Path) -> None:
    text = ("TIMESTAMP,ContextTokens,GeneratedTokens\n"
            "2023-11-16 18:15:46.6805900,374,44\n"
            "2023-11-16 18:15:50.9951690,396,109\n")
    w = read_trace(write(tmp_path, text))
    assert w.arrival_times_s[1] == pytest.approx(4.314579, abs=1e-6)
    assert w.prompt_tokens.tolist() == [374, 396]


def test_azure_2024_layout_with_timezone(tmp_path: Path) -> None:
    text = ("TIMESTAMP,ContextTokens,GeneratedTokens\n"
            "2024-05-10 00:00:00.009930+00:00,2162,5\n"
            "2024-05-10 00:00:02.509930+00:00,1000,25\n")
    w = read_trace(write(tmp_path, text))
    assert w.arrival_times_s.tolist() == pytest.approx([0.0, 2.5])
    assert w.output_tokens.tolist() == [5, 25]


def test_burstgpt_layout_sorts_by_time(tmp_path: Path) -> None:
    text = ("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
            "10,ChatGPT,472,18,490,Conversation log\n"
            "5,GPT-4,1000,0,1000,API log\n")
    w = read_trace(write(tmp_path, text))
    assert w.arrival_times_s.tolist() == [0.0, 5.0]
    assert w.prompt_tokens.tolist() == [1000, 472]
    assert w.output_tokens.tolist() == [1, 18]  # a zero-token response still produces its first token


def test_bad_row_is_reported_with_its_line_number(tmp_path: Path) -> None:
    text = "arrived_at,num_prefill_tokens,num_decode_tokens\n0.0,10,1\n\n1.0,abc,3\n"
    with pytest.raises(SpecError, match=r"t\.csv: line 4: cannot parse row"):
        read_trace(write(tmp_path, text))


def test_non_positive_prompt_is_rejected_with_line_number(tmp_path: Path) -> None:
    text = "arrived_at,num_prefill_tokens,num_decode_tokens\n0.0,10,1\n1.0,0,3\n"
    with pytest.raises(SpecError, match="line 3: token counts must be positive"):
        read_trace(write(tmp_path, text))


def test_unknown_header_names_the_expected_layouts(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="unrecognised CSV header.*arrived_at"):
        read_trace(write(tmp_path, "time,in,out\n0,1,1\n"))


def test_empty_trace_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="no requests"):
        read_trace(write(tmp_path, "arrived_at,num_prefill_tokens,num_decode_tokens\n"))
    with pytest.raises(SpecError, match="file not found"):
        read_trace(tmp_path / "missing.csv")
    with pytest.raises(SpecError, match="presets: coding, conversation"):
        load_workload(str(tmp_path / "nope.csv"))


def test_trace_replay_scales_time_and_poisson_is_seeded(tmp_path: Path) -> None:
    w = read_trace(write(tmp_path, "arrived_at,num_prefill_tokens,num_decode_tokens\n0,10,1\n2,20,2\n4,30,3\n"))
    t, p, o = w.trace_requests(rate_scale=2.0)
    assert t.tolist() == [0.0, 1.0, 2.0] and p.tolist() == [10, 20, 30]
    t, _, _ = w.trace_requests(rate_scale=2.0, duration_s=1.5)
    assert t.tolist() == [0.0, 1.0]
    a = w.poisson_requests(5.0, 100.0, seed=1)
    b = w.poisson_requests(5.0, 100.0, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert a[0].size == pytest.approx(500, rel=0.2) and a[0].max() < 100.0
