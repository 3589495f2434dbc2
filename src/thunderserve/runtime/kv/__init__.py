"""KV-cache handling between workers: `quantize` (none / int8 / int4 payloads) and `transport` (framed TCP).

Nothing is imported here, so `import thunderserve.runtime.kv.transport` stays cheap.
"""
