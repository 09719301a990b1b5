"""Models: generation backends (transformers, vLLM server), tiny-model builder, PPM scorer, training."""
