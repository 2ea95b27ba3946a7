"""Bridges to other tools: model-vs-human (shape bias) and torch-fidelity (FID/KID)."""
