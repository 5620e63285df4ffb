"""Sizes of torch modules (memory planning, ComfyUI's memory_required)."""

from __future__ import annotations


def param_count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def module_bytes(module, buffers: bool = True) -> int:
    """Bytes of the module's parameters (and buffers) as they are stored now."""
    total = sum(p.numel() * p.element_size() for p in module.parameters())
    if buffers:
        total += sum(b.numel() * b.element_size() for b in module.buffers())
    return total
