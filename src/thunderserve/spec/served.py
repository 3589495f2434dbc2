"""Architecture facts of an engine model reference (what `serve --model` names), for planning and serving.

Lives in `spec/` so the CLI, the launcher and benchmarks share it without importing each other (it was in
`cli/serve_cmds.py`, which `runtime/launch/serve.py` imported back: an import circle).
"""

from __future__ import annotations

from thunderserve.spec.model import ModelSpec, load_model

# The fake engine's shape (runtime/fakes.py): byte-level vocabulary, tiny layers.
FAKE_MODEL = ModelSpec(name="fake", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=4,
                       intermediate_size=128, vocab_size=258, max_context_tokens=512, dtype_bytes=4)


def model_spec_for(model: str) -> ModelSpec:
    """The architecture facts of an engine model reference (catalog entry, HF directory, or the fake)."""
    if model == "fake" or model.startswith("fake:"):
        return FAKE_MODEL
    if model.lower() in ("smollm2", "smollm2-135m"):
        return load_model("smollm2-135m")
    return load_model(model)
