"""KV-compression quality: the gate (`gate`, pure, cheap to import), the fixed corpus (`corpus`), and the
measurements on a real model (`perplexity` on the corpus, `greedy` agreement on chat prompts, `bench` both).

Nothing is imported here, so `import thunderserve.quality.gate` stays free of torch.
"""
