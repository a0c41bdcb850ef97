"""Kernel development tools: what measured the choices inside the fused kernels (README.md says which is which)."""
