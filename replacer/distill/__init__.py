"""Distillation services: block-wise (each site on its own teacher pairs) and end-to-end."""
