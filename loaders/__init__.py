"""Model files: discovery, format detection, conversion (pickled checkpoints ->
safetensors, key renames, deltas), building networks from configs."""
