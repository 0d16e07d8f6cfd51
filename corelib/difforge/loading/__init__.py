"""Checkpoint loading: ModelConfig/fetch_model, safetensors headers, fingerprints, detection,
converters, meta-device construction and safe loading of pickled checkpoints."""
