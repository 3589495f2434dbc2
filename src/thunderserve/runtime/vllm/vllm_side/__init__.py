"""Modules that run inside vLLM's own processes (its environment, not ours).

This directory (not the package) is put on the vLLM instances' PYTHONPATH, so its modules are importable there
as top-level modules; they import vLLM and NIXL only, never thunderserve (whose dependencies vLLM's environment
does not have).
"""
