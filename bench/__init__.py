"""Throughput benchmark of the sign_kernels optimizers against fused AdamW and peers.

Run ``python -m bench`` (``--help`` for the flags); bench/README.md explains the output,
bench/NOTES.md the byte accounting and methodology.
"""
