"""Pure functions and data types: no ComfyUI, no model files."""
