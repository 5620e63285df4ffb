"""nn.Modules that neither ComfyUI nor diffusers/transformers provide."""
