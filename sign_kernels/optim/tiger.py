"""Tiger (Su 2023, "Tight-fisted Optimizer"), with parameter roles for PyTorch models."""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from ..backends.reference import ROLE_ELEMENTWISE, ROLE_EMBEDDING, ROLE_GAIN, ROLE_MATRIX
from ..distributed import _dtensor
from ._base import SignOptimizer, _check_lr, _check_nonneg, _check_unit

ROLES = {
    "elementwise": ROLE_ELEMENTWISE,
    "gain": ROLE_GAIN,
    "embedding": ROLE_EMBEDDING,
    "matrix": ROLE_MATRIX,
}

_NORM_TYPES = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.batchnorm._NormBase,
    nn.RMSNorm,
)
_EMBEDDING_TYPES = (nn.Embedding, nn.EmbeddingBag)
_NORM_WORDS = ("norm", "ln", "bn")
_EMBED_WORDS = ("embed", "wte", "wpe", "tok_emb", "pos_emb")


def role_of(p: torch.Tensor, name: Optional[str] = None) -> str:
    """The default role of a parameter (used when its param group names none).

    By name, when the optimizer was given named parameters: a name ending in ``bias`` is
    element-wise; a 0/1-d ``weight``/``scale``/``gamma`` whose name mentions a norm
    (``norm``, ``ln``, ``bn``) is a norm gain; a 2-d+ tensor whose name mentions an embedding
    (``embed``, ``wte``, ``wpe``, ``tok_emb``, ``pos_emb``) is an embedding table.
    Otherwise, and for plain parameters: ``ndim <= 1`` is element-wise, anything else a matrix.
    For exact roles use :func:`tiger_param_groups`, which reads module types.
    """
    if name is not None:
        lowered = name.lower()
        leaf = lowered.rsplit(".", 1)[-1]
        if leaf.endswith("bias"):
            return "elementwise"
        if p.ndim <= 1 and leaf in ("weight", "scale", "gamma", "g") and any(w in lowered for w in _NORM_WORDS):
            return "gain"
        if p.ndim >= 2 and any(w in lowered for w in _EMBED_WORDS):
            return "embedding"
    return "elementwise" if p.ndim <= 1 else "matrix"


def tiger_param_groups(
    model: nn.Module,
    lr: Optional[float] = None,
    weight_decay: Optional[float] = None,
) -> List[Dict[str, Any]]:
    """Param groups for :class:`Tiger`, one per role, classified by module type.

    * weights of normalisation layers (LayerNorm, RMSNorm, GroupNorm, BatchNorm, ...): ``gain``
      (element-wise lr, no decay, NaN guard shrinks towards 1);
    * every bias, and the shift of a normalisation layer: ``elementwise``;
    * weights of ``nn.Embedding``/``nn.EmbeddingBag``: ``embedding`` (lr scaled by each row's RMS);
    * other parameters: :func:`role_of` (``ndim <= 1`` element-wise, else ``matrix``).

    Shared (tied) parameters appear once. ``lr``/``weight_decay``, when given, are set on every
    group; groups carry ``param_names``. Empty groups are left out.
    """
    groups: Dict[str, Dict[str, list]] = {r: {"params": [], "param_names": []} for r in ROLES}
    seen = set()
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if isinstance(module, _NORM_TYPES):
                role = "gain" if p_name == "weight" else "elementwise"
            elif isinstance(module, _EMBEDDING_TYPES) and p_name == "weight":
                role = "embedding"
            elif p_name.endswith("bias"):
                role = "elementwise"
            else:
                role = role_of(p)
            groups[role]["params"].append(p)
            groups[role]["param_names"].append(full)
    out = []
    for role, g in groups.items():
        if not g["params"]:
            continue
        group: Dict[str, Any] = {"params": g["params"], "param_names": g["param_names"], "role": role}
        if lr is not None:
            group["lr"] = lr
        if weight_decay is not None:
            group["weight_decay"] = weight_decay
        out.append(group)
    return out


# NOTE: [cached sums of squares] (issue 15) RMS(θ_{t-1}) of the matrix and embedding roles is
# what made Tiger read θ twice per step. The op hands out the sums of squares of θ as it leaves
# it (NOTE: [Tiger sums of squares out] in sign_kernels/_ops.py), summed in the order of its
# own pre-pass; the optimizer keeps them per bucket (outside the state dict) with each param's
# (version counter, data pointer) right after the call, and gives them back at the next call
# while both are unchanged, so that call reads θ only to update it and its RMS is the same
# bits. Anything that writes a param through autograd's view of it bumps its version: in-place
# ops on the param (also under no_grad), ``model.load_state_dict`` (copy_), another optimizer
# step (every op call counts its write: NOTE: [version counters] in _base.py); ``p.data = t``
# changes the data pointer. A write
# that bypasses the version counter (through ``p.data``, or raw pointers) is not seen: call
# ``optimizer.forget_rms()`` after one. ``load_state_dict`` of the optimizer forgets the sums.
# Every backend produces the sums (each in its own pre-pass's order).
_SUMSQ_BACKENDS = ("cpu", "reference", "cuda", "triton")
_SUMSQ_CACHE_SIZE = 64

# NOTE: [GradScaler's flag as the NaN guard] (issue 15) Tiger's NaN guard needs a tensor's
# whole gradient read before any of it is written: the one read of g that a Tiger step makes
# beyond Lion's. Under GradScaler that read has been made already: GradScaler.step sets
# ``found_inf`` from torch's own check of these very gradients (inf or NaN anywhere, of the
# scaled g; ShardedGradScaler reduces it over the ranks), and a step it flags changes nothing.
# So where found_inf is given and 0, no gradient holds a NaN, and no g / grad_scale does
# (a finite g over a finite, non-zero scale is not NaN): the guard cannot fire. The optimizer
# then hands the op found_inf itself as every tensor's NaN count (the op's given statistics,
# NOTE: [Tiger statistics input] in sign_kernels/_ops.py), copied on the device (no host
# sync), and the op reads g once. The same bits as the guard's own read; one read of g fewer.
# It trusts found_inf as torch's optimizers do: a found_inf set to 0 by hand over NaN
# gradients lets the NaNs through (tests/test_tiger_rms_cache.py shows both). Sharded
# buckets put the same flag into the statistics collective in place of the norms of g
# (sign_kernels/distributed/_dtensor.py; tests/_sharded_cases.py case_fsdp_scaler).


class _SumsqEntry:
    """The sums of squares of one bucket's θ: where each tensor's are, and what they describe."""

    __slots__ = ("buf", "at", "n", "seen", "owners")

    def __init__(self, buf, at, n, keys):
        self.buf = buf  # fp64, one entry per matrix, one per embedding row, then the NaN flag
        self.at = at    # index of each tensor's sums in buf, -1: none (element-wise roles, empty)
        self.n = n      # the n of its RMS: numel (matrix) or row length (embedding)
        self.seen: List[Optional[tuple]] = [None] * len(at)  # (version, data_ptr) they describe
        # The params themselves (the key holds their ids, which a new param may reuse).
        self.owners = [weakref.ref(k) for k in keys]


class Tiger(SignOptimizer):
    r"""Tiger: the sign of an EMA momentum, with gradient accumulation inside the momentum.

    One ``step()`` per micro-batch; :math:`t` counts calls from 0, :math:`k` = ``grad_accum_steps``:

    .. math::
        b_1 &= \beta \text{ if } t \bmod k = 0 \text{ else } 1 \\
        m &\leftarrow b_1 m + \tfrac{1-\beta}{k} g \\
        \theta &\leftarrow \theta - \eta_p (\mathrm{sign}(m) + \lambda_p \theta)
            \quad \text{when } (t+1) \bmod k = 0

    ``lr`` is relative; each parameter's role sets :math:`\eta_p, \lambda_p`:

    * ``elementwise`` (biases, norm shifts) and ``gain`` (norm weights): :math:`0.5\eta`, no decay;
    * ``embedding``: :math:`\eta \cdot \mathrm{RMS}` of each row (over the last dim), decay :math:`\lambda`;
    * ``matrix``: :math:`\eta \cdot \mathrm{RMS}(\theta_{t-1})` of the whole tensor, decay :math:`\lambda`.

    NaN guard, per tensor: if its gradient holds a NaN, ``exp_avg`` is kept and
    :math:`\theta \leftarrow (\theta - c) s + c` with :math:`s` = ``shrink_ratio`` and :math:`c`
    the init centre (1 for ``gain``, else 0).

    RMS(θ) is read from sums of squares the previous step left (every backend; the same bits
    as reading θ) while the param's version counter and storage
    are unchanged; after writing a param through ``p.data``, call :meth:`forget_rms`.

    Roles: a param group's ``role`` key sets the role of all its params; otherwise each param
    gets :func:`role_of` (by name when the optimizer was given ``model.named_parameters()``,
    else by ndim). :func:`tiger_param_groups` classifies a model by module type.

    Args:
        params: parameters, named parameters or param groups (``tiger_param_groups(model)``).
        lr: relative learning rate :math:`\eta` (float or 0-dim tensor).
        beta: momentum :math:`\beta` in [0, 1).
        weight_decay: :math:`\lambda \ge 0` (matrices and embeddings only).
        grad_accum_steps: :math:`k \ge 1` micro-batches per parameter update.
        shrink_ratio: :math:`s \in (0, 1]` of the NaN guard.
        **options: as :class:`Lion`'s (``max_grad_norm``, ``backend``, ``momentum_dtype`` including
            torch.int8, ``error_correction``, ``stochastic_rounding``, ``seed``, torch.optim's flags).
    """

    _op_name = "tiger_"
    _state_key = "exp_avg"
    _family = "Tiger"
    _compressed_backends = frozenset({"reference", "cpu", "cuda", "triton"})

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        beta: float = 0.965,
        weight_decay: float = 0.01,
        *,
        grad_accum_steps: int = 1,
        shrink_ratio: float = 0.99,
        **options,
    ):
        hparams = dict(lr=lr, beta=beta, weight_decay=weight_decay, grad_accum_steps=grad_accum_steps,
                       shrink_ratio=shrink_ratio, role=None)
        super().__init__(params, hparams, options)

    def _reset_caches(self) -> None:
        super()._reset_caches()
        self._role_cache: Dict[int, tuple] = {}
        self._sumsq_cache: "OrderedDict[tuple, _SumsqEntry]" = OrderedDict()
        self._pending_sums: Dict[int, _SumsqEntry] = {}  # bucket -> entry, during its op call

    def forget_rms(self) -> None:
        """Forget the cached sums of squares of θ (NOTE: [cached sums of squares]).

        Needed only after writing a parameter in a way its version counter does not see
        (``p.data.copy_(...)``, a raw pointer); the next step then reads θ for its RMS.
        """
        self._sumsq_cache.clear()

    def _sumsq_entry(self, group, bucket) -> Optional[_SumsqEntry]:
        """The cached sums of a bucket (created empty), or None where the backend makes none.

        Sums describe the tensors the kernels see (local shards of DTensors)."""
        if bucket.backend.name not in _SUMSQ_BACKENDS:
            return None
        roles = self._roles(group)
        key = (bucket.backend.name,
               tuple((id(k), p.shape, roles[j]) for k, p, j in zip(bucket.keys, bucket.params, bucket.positions)))
        entry = self._sumsq_cache.get(key)
        if entry is None:
            at, n, size = [], [], 0
            for p, j in zip(bucket.params, bucket.positions):
                role = roles[j]
                if p.numel() == 0 or role not in (ROLE_MATRIX, ROLE_EMBEDDING):
                    at.append(-1)
                    n.append(0)
                    continue
                at.append(size)
                if role == ROLE_EMBEDDING:
                    n.append(p.shape[-1])
                    size += p.numel() // p.shape[-1]
                else:
                    n.append(p.numel())
                    size += 1
            # Then one entry for GradScaler's found_inf as the bucket's NaN count (NOTE:
            # [GradScaler's flag as the NaN guard]) and one per tensor for the NaN flags of the
            # norm pass (max_grad_norm; NOTE: [clipping inside the step] in _clip.py); no
            # tensor's sums range reaches them.
            buf = torch.zeros(size + 1 + len(at), dtype=torch.float64, device=bucket.params[0].device)
            entry = self._sumsq_cache[key] = _SumsqEntry(buf, at, n, bucket.keys)
            while len(self._sumsq_cache) > _SUMSQ_CACHE_SIZE:
                self._sumsq_cache.popitem(last=False)
        elif any(ref() is not k for ref, k in zip(entry.owners, bucket.keys)):
            entry = self._sumsq_cache[key] = _SumsqEntry(entry.buf, entry.at, entry.n, bucket.keys)
        else:
            self._sumsq_cache.move_to_end(key)
        return entry

    @staticmethod
    def _sums_valid(entry: _SumsqEntry, bucket) -> List[bool]:
        """Which tensors' cached sums describe θ as it is now (version and storage unchanged)."""
        return [at >= 0 and seen is not None and seen == (p._version, p.data_ptr())
                for at, seen, p in zip(entry.at, entry.seen, bucket.params)]

    def cached_local_sums(self, group, bucket):
        """(buffer, index of each tensor's sums or -1 where they are not valid), or None.

        The sharded step reduces these instead of reading θ (sign_kernels.distributed._dtensor)."""
        entry = self._sumsq_entry(group, bucket)
        if entry is None:
            return None
        return entry.buf, [at if ok else -1 for at, ok in zip(entry.at, self._sums_valid(entry, bucket))]

    def local_sums(self, group, bucket):
        """(buffer, index of each tensor's sums or -1 where it has none): the sums of squares of
        the bucket's θ as this backend's tiger_ op sums them, every wanted one valid.

        Where the cached ones no longer describe θ (a first step, a resumed run, θ changed), the
        op is called once in a mode that writes nothing (found_inf set) and fills them from θ
        in its own pre-pass order: the bits the write pass would have left (NOTE: [Tiger sums
        of squares out] in sign_kernels/_ops.py). The sharded step reduces these
        (sign_kernels.distributed._dtensor, NOTE: [cached sums in the collective])."""
        cached = self.cached_local_sums(group, bucket)
        entry = self._sumsq_entry(group, bucket)
        if cached is None or entry is None:
            return cached
        buf, at = cached
        stale = [e if (a < 0 and e >= 0) else -1 for a, e in zip(at, entry.at)]  # wanted, not valid
        if all(x < 0 for x in stale):
            return buf, at
        device = bucket.params[0].device
        params = [p if p.is_contiguous() else p.contiguous() for p in bucket.params]
        n = len(params)
        step = self._device_scalar(device, torch.int64, 0)
        skip = self._device_scalar(device, torch.float32, 1.0)
        roles, lr, lr_t, beta, wd, k, shrink = self._op_args(group, bucket, 0.0, None)
        # The bucket's own state format selects the op's path, whose order the sums follow
        # (8-bit momentum and the correction byte have theirs): the real state goes in.
        # params stand in for the grads: nothing is read of them but θ, and nothing is
        # written (found_inf set), whatever the step counts say.
        _, bufs, kw = self._bucket_state(group, bucket)
        bucket.backend.fn(self._op_name)(params, params, bufs, [step] * n, roles, 0.0, None, beta, wd, k, shrink,
                                         None, skip, [0] * n, False, sumsq_out=entry.buf, sumsq_out_at=stale, **kw)
        seen = list(entry.seen)
        for i, (e, p) in enumerate(zip(stale, bucket.params)):
            if e >= 0:
                seen[i] = (p._version, p.data_ptr())
        entry.seen = seen
        return buf, list(entry.at)

    def _op_extra(self, group, bucket, found_inf) -> tuple:
        self._pending_sums.clear()  # one op call at a time; a call that raised left its entry here
        entry = self._sumsq_entry(group, bucket)
        clip = self._clip_step
        if entry is None:
            assert clip is None, "every backend makes Tiger's sums of squares (_SUMSQ_BACKENDS)"
            return bucket.extra
        valid = self._sums_valid(entry, bucket)
        entry.seen = [None] * len(valid)  # until the op has written them (a call that raises leaves none)
        self._pending_sums[id(bucket)] = entry
        n = len(valid)
        if bucket.extra:  # a sharded bucket: the whole tensors' statistics (their sums came from these)
            extra = tuple(bucket.extra)
            if clip is not None:
                extra = self._sharded_clip_flags(bucket, extra, clip)
            return extra + (entry.buf, entry.at)
        # Given where θ is as the sums left it; -1 (read θ) elsewhere.
        given = [at if ok else -1 for at, ok in zip(entry.at, valid)]
        nan = [-1] * n
        if clip is not None:
            # NOTE: [clipping inside the step] (_clip.py): the norm pass read g; its sums say
            # which tensors hold a NaN, so the op does not read g for the guard.
            base = entry.buf.numel() - n
            entry.buf[base:].copy_(clip.flags[bucket.clip_at:bucket.clip_at + n], non_blocking=True)
            nan = list(range(base, base + n))
        elif found_inf is not None:  # NOTE: [GradScaler's flag as the NaN guard]
            flag = entry.buf.numel() - n - 1
            entry.buf[flag].copy_(found_inf)
            nan = [flag] * n
        return (entry.buf, nan, given, entry.n, entry.buf, entry.at)

    @staticmethod
    def _sharded_clip_flags(bucket, extra: tuple, clip) -> tuple:
        """A sharded bucket's statistics with the norm pass's NaN flags of the whole tensors.

        The collective carried each tensor's sum of squares of g where it carries a NaN count
        without clipping; the op fires its guard on a non-zero entry, so it gets the flags
        (NaN sum -> 1) appended to the statistics instead, for every tensor of the bucket."""
        stats, _, sq_i, n_i = extra
        cat = clip.cache.get("stats")
        if cat is None or cat[0] is not stats:
            cat = clip.cache["stats"] = (stats, torch.cat([stats, clip.flags.to(stats.device, non_blocking=True)]))
        base = stats.numel() + bucket.clip_at
        return (cat[1], list(range(base, base + len(sq_i))), sq_i, n_i)

    def _op_done(self, group, bucket) -> None:
        entry = self._pending_sums.pop(id(bucket), None)
        if entry is None:
            return
        # _run_bucket has counted the op's write in the versions (NOTE: [version counters]).
        entry.seen = [(p._version, p.data_ptr()) if at >= 0 else None for at, p in zip(entry.at, bucket.params)]

    def _validate_hparams(self, group, where: str) -> None:
        _check_lr(group["lr"], where)
        _check_unit("beta", group["beta"], where)
        _check_nonneg("weight_decay", group["weight_decay"], where)
        k = group["grad_accum_steps"]
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"{where}: grad_accum_steps must be an int >= 1, got {k!r}")
        s = group["shrink_ratio"]
        if not isinstance(s, (int, float)) or not (0.0 < s <= 1.0):
            raise ValueError(f"{where}: shrink_ratio must be in (0, 1], got {s!r}")
        role = group.get("role")
        if role is not None and role not in ROLES:
            raise ValueError(f"{where}: role must be None or one of {tuple(ROLES)}, got {role!r}")
        if role == "embedding":
            for i, p in enumerate(group["params"]):
                if p.ndim < 2:
                    raise ValueError(f"{where}: param {i} has role 'embedding' but {p.ndim} dims; embedding tables are 2-d+")

    def _roles(self, group) -> tuple:
        """Role codes of the group's params, in order (cached while the group is unchanged)."""
        key = (group.get("role"), tuple(id(p) for p in group["params"]))
        cached = self._role_cache.get(id(group))
        if cached is not None and cached[0] == key:
            return cached[1]
        if group.get("role") is not None:
            roles = tuple(ROLES[group["role"]] for _ in group["params"])
        else:
            names = group.get("param_names") or [None] * len(group["params"])
            roles = tuple(ROLES[role_of(p, n)] for p, n in zip(group["params"], names))
        self._role_cache[id(group)] = (key, roles)
        return roles

    def _prepare_sharded(self, plan, grad_scale, found_inf, clip=None):
        # Whole-tensor RMS and NaN flags of sharded tensors (and, when clipping, the sums of
        # squares of their gradients): one all-reduce per process group.
        _dtensor.global_stats(self, plan, grad_scale, found_inf, clip, tiger=True)

    def _op_args(self, group, bucket, lr, lr_t):
        roles = self._roles(group)
        return (
            [roles[j] for j in bucket.positions],
            lr,
            lr_t,
            float(group["beta"]),
            float(group["weight_decay"]),
            int(group["grad_accum_steps"]),
            float(group["shrink_ratio"]),
        )
