#!/usr/bin/env python
"""A sign optimizer on an FSDP2-sharded model, with a distributed checkpoint and its resume.

    torchrun --nproc_per_node 2 examples/train_fsdp.py                  # CPU (gloo) or GPUs (nccl)
    torchrun --nproc_per_node 4 examples/train_fsdp.py --optimizer lion --steps 40

Each rank builds the same small GPT-style model, shards it with ``fully_shard`` (each block,
then the root), and hands ``model.parameters()`` -- DTensors holding 1/N of every tensor -- to
the optimizer unchanged. Tiger gets ``tiger_param_groups(model)`` (roles by module type); its
whole-tensor RMS and NaN guard are reduced across the shards by the optimizer itself. Every
rank trains on its own slice of each batch of random tokens. Halfway, the model and optimizer
are saved with ``torch.distributed.checkpoint`` (each rank writes its shards) and loaded into
a fresh model and optimizer, which finish the run; the final parameters are compared with a
run that was never interrupted, on every rank (the resume is exact: "resume bit-identical").
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard

import sign_kernels as sk


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.heads = heads

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    def __init__(self, vocab=256, d=64, heads=4, layers=2, ctx=32):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def build(args, device):
    torch.manual_seed(0)  # the same initial weights on every rank
    model = TinyGPT().to(device)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    if args.optimizer == "tiger":
        opt = sk.Tiger(sk.tiger_param_groups(model), lr=args.lr or 1e-2, weight_decay=0.01)
    elif args.optimizer == "lion":
        opt = sk.Lion(model.parameters(), lr=args.lr or 2e-3, betas=(0.9, 0.95), weight_decay=0.1)
    else:
        opt = sk.Simba(model.parameters(), lr=args.lr or 2e-3, weight_decay=0.1)
    return model, opt


def train(model, opt, steps, first, args, device):
    rank, world = dist.get_rank(), dist.get_world_size()
    losses = []
    for step in range(first, first + steps):
        # The global batch of this step (the same on every rank): counting sequences from a
        # random start, a pattern the model can learn (the next byte is the last one plus 1).
        gen = torch.Generator().manual_seed(step)
        start = torch.randint(0, 256, (args.batch, 1), generator=gen)
        tokens = ((start + torch.arange(33)) % 256).to(device)
        mine = tokens.chunk(world)[rank]  # this rank's slice of it
        logits = model(mine[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), mine[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--optimizer", choices=("tiger", "lion", "simba"), default="tiger")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=None)
    args = ap.parse_args()

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    half = args.steps // 2

    # The uninterrupted run.
    model, opt = build(args, device)
    losses = train(model, opt, args.steps, 0, args, device)
    if rank == 0:
        print(f"{args.optimizer}: loss of rank 0's slice {losses[0]:.3f} at step 0, {losses[-1]:.3f} at step "
              f"{args.steps - 1} ({dist.get_world_size()} ranks, {'nccl' if use_cuda else 'gloo'})")

    # The same run, checkpointed halfway and resumed in a fresh model and optimizer.
    ckpt = [tempfile.mkdtemp(prefix="train_fsdp_") if rank == 0 else None]
    dist.broadcast_object_list(ckpt)
    m1, o1 = build(args, device)
    train(m1, o1, half, 0, args, device)
    dcp.save({"model": get_model_state_dict(m1), "optim": get_optimizer_state_dict(m1, o1)}, checkpoint_id=ckpt[0])
    m2, o2 = build(args, device)
    state = {"model": get_model_state_dict(m2), "optim": get_optimizer_state_dict(m2, o2)}
    dcp.load(state, checkpoint_id=ckpt[0])
    set_model_state_dict(m2, state["model"])
    set_optimizer_state_dict(m2, o2, state["optim"])
    train(m2, o2, args.steps - half, half, args, device)
    same = all(torch.equal(a._local_tensor, b._local_tensor) for a, b in zip(model.parameters(), m2.parameters()))
    same = torch.tensor(int(same), device=device)
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    if rank == 0:
        print(f"resumed from a DCP checkpoint at step {half}: "
              f"{'bit-identical to' if same.item() else 'DIFFERENT from'} the uninterrupted run")
    dist.destroy_process_group()
    if not same.item():
        raise SystemExit(1)


if __name__ == "__main__":
    main()
