"""Adapters that run BSA inside other libraries than ComfyUI (each imports its library lazily)."""
