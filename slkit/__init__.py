"""slkit: Self-Lengthen on one consumer GPU. See README.md; `slkit run params/demo.yaml` runs the loop."""
__version__ = "0.1.0"
