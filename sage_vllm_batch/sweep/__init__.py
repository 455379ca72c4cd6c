"""Fused sweeps: many sampling points, one loaded engine."""
