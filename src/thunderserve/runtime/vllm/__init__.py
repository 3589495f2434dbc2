"""Plan groups served by vLLM instances: one vLLM OpenAI server per group, KV moved by vLLM's connector.

`instances` turns a plan into launch specs (pure), `launcher` starts them as local processes, `client` is the
group-client seam (HTTP to a vLLM instance, or an in-repo fake), `router` routes requests over groups through
that seam, and `deploy` wires them behind our OpenAI API.
"""
