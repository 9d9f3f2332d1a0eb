"""What a multi-process run adds to the optimizers (DESIGN.md layer 6).

``_dtensor``: DTensor params (FSDP2, tensor parallel) -- the kernels see local shards, state
has the param's placements, Tiger's whole-tensor statistics are reduced once per step. The
optimizers use it by themselves; nothing here needs to be called by a user.
"""
