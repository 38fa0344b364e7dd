"""Descriptor code: pure torch/numpy, no engine imports."""
