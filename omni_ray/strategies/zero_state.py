"""ZeRO's optimizer state, translated to and from the per-parameter layout the rest of omni_ray uses.

Under ZeRO the torch optimizer steps flat fp32 partitions (one per parameter group per rank),
not the model's parameters. Checkpoints and the freeze audit want the state by parameter:

* ``full_state_by_name``: full fp32 Adam moments by parameter name on rank 0, in the layout of
  FSDP2's full optimizer state dict, so a checkpoint loads onto any world size, ZeRO stage or
  FSDP2 (collective under ZeRO-3);
* ``load_full_state``: every rank copies its partitions out of such full tensors (local);
* ``local_state``: parameter -> this rank's fragment of its state, for the audit (local);
* ``local_shard`` / ``ShardReader`` / ``load_shards``: the sharded checkpoint. Every rank writes
  the fragments it owns (fp32 master and Adam moments of its slice of each trained parameter)
  keyed by parameter name and their offset in the flattened parameter, into its own safetensors
  file; nothing is gathered. A reader on any world size (or none: export) reassembles whatever
  range of whichever parameter it needs from all ranks' files.

Fragments. ZeRO-1/2 cut each parameter group into one flat fp32 partition per rank, so a
parameter's fragment on a rank is any contiguous range of it (``_hp_mapping.lp_fragment_address``)
or nothing. ZeRO-3 pads every parameter to ``world * partition_numel`` and gives rank r the range
``[r * partition_numel, (r + 1) * partition_numel)``; the padding is never written. A frozen
parameter (written only when the checkpoint is not trainable-only) is the 16-bit value the model
computes with: under ZeRO-3 each rank writes its partition, under ZeRO-1/2 (replicated) one rank
writes the whole tensor, taking turns by index. Offsets assume ZeRO partitions over the whole
data-parallel world (no hpZ/MiCS sub-groups, which omni_ray does not configure).

Torch's Adam creates its state lazily at the first step; ``ensure_state`` creates zeros before
that, because DeepSpeed's per-parameter accessors need it to exist.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from omni_ray.errors import UserError

ADAM_STATE = ("exp_avg", "exp_avg_sq")
KINDS = ("param",) + ADAM_STATE  # what a fragment holds: the fp32 master (or frozen value), the moments
SHARD_FORMAT = "omni_ray.zero_shard/1"
SHARD_FILE = re.compile(r"zero_rank(\d{5})-of-(\d{5})\.safetensors")


class ShardError(UserError, ValueError):
    """A sharded ZeRO checkpoint that is incomplete or does not fit this model."""


def shard_file_name(rank: int, world: int) -> str:
    """Rank-unique, so Ray Train can upload every rank's file into one checkpoint directory."""
    return f"zero_rank{rank:05d}-of-{world:05d}.safetensors"


def flat_partitions(zero_optimizer) -> list[torch.Tensor]:
    """This rank's flat fp32 partitions: the tensors the torch optimizer steps and keeps state for."""
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):  # ZeRO-3, ZeRO-1/2
        flats = getattr(zero_optimizer, attr, None)
        if flats:
            return list(flats)
    raise RuntimeError(f"{type(zero_optimizer).__name__}: no flat fp32 partitions found; is ZeRO enabled?")


def ensure_state(torch_optimizer, zero_optimizer, int_step: bool) -> None:
    """Create the (zero) Adam state of every flat partition if no step has run yet.

    ``int_step``: DeepSpeedCPUAdam (ZeRO-Offload) counts steps in a Python int, torch in a tensor.
    """
    state = torch_optimizer.state
    for flat in flat_partitions(zero_optimizer):
        if not state.get(flat):
            state[flat] = {"step": 0 if int_step else torch.tensor(0.0), "exp_avg": torch.zeros_like(flat),
                           "exp_avg_sq": torch.zeros_like(flat)}
    if hasattr(zero_optimizer, "_lazy_init_hp_params_optimizer_state"):
        # ZeRO-1/2 maps each parameter's fragment of the Adam state once, right after the first
        # group's first step, when later groups have no state yet; map again now that all have.
        zero_optimizer._hp_optimizer_states_linked = False
        zero_optimizer._lazy_init_hp_params_optimizer_state()


def adam_step(torch_optimizer) -> float:
    steps = [float(s["step"]) for s in torch_optimizer.state.values() if "step" in s]
    return max(steps, default=0.0)


def full_state_by_name(named_params: list, rank: int, step: float) -> dict[str, dict]:
    """{name: {step, exp_avg, exp_avg_sq}} of the trainable parameters, full fp32, on rank 0. Collective."""
    from deepspeed.utils import safe_get_full_optimizer_state

    per_param = {}
    for name, param in named_params:
        if not param.requires_grad:
            continue
        entry = {"step": torch.tensor(step)}
        for key in ADAM_STATE:
            value = safe_get_full_optimizer_state(param, key)  # collective under ZeRO-3
            if rank == 0:
                entry[key] = value.detach().to("cpu").clone()
        per_param[name] = entry
    return per_param


def load_full_state(named_params: list, saved: dict[str, dict], torch_optimizer, device) -> None:
    """Copy full per-name moments into this rank's partitions and set the Adam step count."""
    from deepspeed.utils import safe_set_full_optimizer_state

    missing = [n for n, p in named_params if p.requires_grad and n not in saved]
    if missing:
        raise ValueError(f"the checkpoint's optimizer state has no entry for trained parameters {missing[:3]}; "
                         "was it written with another freeze map?")
    for name, param in named_params:
        if param.requires_grad:
            for key in ADAM_STATE:
                safe_set_full_optimizer_state(param, saved[name][key].to(device, torch.float32), key)
    set_adam_step(torch_optimizer, max((float(e["step"]) for e in saved.values()), default=0.0))


def set_adam_step(torch_optimizer, step: float) -> None:
    for flat_state in torch_optimizer.state.values():
        old = flat_state["step"]
        flat_state["step"] = int(step) if isinstance(old, int) else torch.tensor(step, dtype=old.dtype)


def local_state(params: list) -> dict:
    """Parameter -> {key: this rank's fragment} for every parameter ZeRO holds optimizer state for.

    A parameter whose fragment lies wholly on other ranks has none here; the audit runs on every
    rank, so each parameter with state is seen by the rank that holds it.
    """
    out = {}
    for param in params:
        if hasattr(param, "ds_id"):  # ZeRO-3
            # Not the public safe_get_local_optimizer_state: it answers None for a parameter whose
            # requires_grad is off, which is exactly the parameter the audit has to see.
            fragments = {k: param._z3_optimizer._get_fp32_opt_state_partition(
                param, release_swap_buffers=True, optim_state_key=k)[0] for k in ADAM_STATE}
        else:
            mapping = getattr(param, "_hp_mapping", None)
            fragments = {k: mapping.get_optim_state_fragment(k) for k in ADAM_STATE} if mapping and \
                mapping.optim_fragment else {}
        fragments = {k: v for k, v in fragments.items() if v is not None and v.numel()}
        if fragments:
            out[param] = fragments
    return out


# ------------------------------------------------------------------ sharded checkpoints


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _z3_range(param, rank: int) -> tuple[int, int, int]:
    """(offset, valid numel, padded partition numel) of this rank's ZeRO-3 partition of ``param``."""
    size = param.ds_tensor.ds_numel
    offset = rank * size
    return offset, max(0, min(size, param.ds_numel - offset)), size


def _trainable_fragment(param, rank: int) -> tuple[int, dict] | None:
    """(offset, {kind: 1-D fp32 view}) of this rank's part of a trained parameter; None if it has none."""
    if hasattr(param, "ds_id"):  # ZeRO-3
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

        offset, valid, _ = _z3_range(param, rank)
        if not valid:
            return None
        parts = {"param": safe_get_local_fp32_param(param)}
        parts.update({k: safe_get_local_optimizer_state(param, k) for k in ADAM_STATE})
        return offset, {k: v.detach().flatten()[:valid].to("cpu") for k, v in parts.items()}
    mapping = getattr(param, "_hp_mapping", None)  # ZeRO-1/2
    if mapping is None or not mapping.lp_fragment_address.numel:
        return None
    parts = {"param": mapping.get_hp_fragment(), **{k: mapping.get_optim_state_fragment(k) for k in ADAM_STATE}}
    return mapping.lp_fragment_address.start, {k: v.detach().flatten().to("cpu") for k, v in parts.items()}


def _frozen_fragment(param, rank: int, world: int, index: int) -> tuple[int, dict] | None:
    if hasattr(param, "ds_id"):
        offset, valid, _ = _z3_range(param, rank)
        return (offset, {"param": param.ds_tensor.detach().flatten()[:valid].to("cpu")}) if valid else None
    if index % world != rank:  # replicated: the ranks take turns, so no rank writes them all
        return None
    return 0, {"param": param.detach().flatten().to("cpu")}


def full_shape(param) -> list[int]:
    return list(param.ds_shape if hasattr(param, "ds_id") else param.shape)


def local_shard(named_params: list, torch_optimizer, trainable_only: bool) -> tuple[dict, dict]:
    """This rank's part of the checkpoint: (tensors for safetensors, metadata). Local, no collective.

    Tensors are named ``{kind}/{parameter name}`` (kind: param, exp_avg, exp_avg_sq) and are views
    of the optimizer's own partitions (no copy on CPU); the metadata maps each name to the offset
    of its fragment in the flattened parameter and the parameter's full shape.
    """
    rank, world = _rank_world()
    tensors, index, frozen = {}, {}, 0
    for name, param in named_params:
        if param.requires_grad:
            fragment = _trainable_fragment(param, rank)
        elif trainable_only:
            continue
        else:
            fragment, frozen = _frozen_fragment(param, rank, world, frozen), frozen + 1
        if fragment is None:
            continue
        offset, parts = fragment
        tensors.update({f"{kind}/{name}": value.contiguous() for kind, value in parts.items()})
        index[name] = {"offset": offset, "shape": full_shape(param), "trained": bool(param.requires_grad)}
    meta = {"format": SHARD_FORMAT, "rank": rank, "world_size": world, "adam_step": adam_step(torch_optimizer),
            "index": index}
    return tensors, meta


def save_local_shard(directory: str, named_params: list, torch_optimizer, trainable_only: bool) -> Path:
    """Write this rank's file into ``directory``; returns its path."""
    from safetensors.torch import save_file

    tensors, meta = local_shard(named_params, torch_optimizer, trainable_only)
    path = Path(directory) / shard_file_name(meta["rank"], meta["world_size"])
    save_file(tensors, str(path), metadata={"omni_ray": json.dumps(meta)})
    return path


class ShardReader:
    """Every rank's file of one sharded checkpoint, read by parameter name and range.

    Needs no process group and no DeepSpeed (export reads it in one plain process). Only the
    requested slices are read (safetensors reads by offset), so a rank resuming a large model
    holds its own partitions, not the whole state. The files must be one per rank of one save:
    a missing, duplicate or foreign file is an error, never a silent gap.
    """

    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self.handles, self.fragments, self.shapes, self.trained = {}, {}, {}, {}
        metas = []
        for file in sorted(files):
            handle = safe_open(str(file), framework="pt")
            meta = json.loads((handle.metadata() or {}).get("omni_ray", "{}"))
            if meta.get("format") != SHARD_FORMAT:
                raise ShardError(f"{file}: not an omni_ray ZeRO shard (format {meta.get('format')!r})")
            self.handles[file] = handle
            metas.append(meta)
            for name, entry in meta["index"].items():
                self.shapes[name], self.trained[name] = list(entry["shape"]), entry["trained"]
                numel = handle.get_slice(f"param/{name}").get_shape()[0]
                self.fragments.setdefault(name, []).append((file, entry["offset"], numel))
        worlds = {m["world_size"] for m in metas}
        ranks = sorted(m["rank"] for m in metas)
        if len(worlds) != 1 or ranks != list(range(next(iter(worlds)))):
            raise ShardError(f"shard files {[f.name for f in sorted(files)]} are not one file per rank of one save "
                             f"(ranks {ranks}, world sizes {sorted(worlds)}); the checkpoint is incomplete: use an earlier one")
        self.adam_step = max(m["adam_step"] for m in metas)

    @classmethod
    def from_dir(cls, directory: str | Path, names: list[str] | None = None) -> "ShardReader":
        """The shard files in ``directory`` (or only those of ``names``, e.g. a manifest's list)."""
        found = [Path(directory) / n for n in (names if names is not None else
                                                [p.name for p in Path(directory).iterdir()]) if SHARD_FILE.fullmatch(n)]
        if not found:
            raise ShardError(f"{directory}: no ZeRO shard files (zero_rank*-of-*.safetensors)")
        return cls(found)

    def read(self, kind: str, name: str, start: int, numel: int) -> torch.Tensor:
        """Elements ``[start, start + numel)`` of the flattened ``kind`` of parameter ``name``."""
        pieces, covered = [], 0
        for file, offset, length in sorted(self.fragments.get(name, []), key=lambda f: f[1]):
            lo, hi = max(start, offset), min(start + numel, offset + length)
            if lo < hi:
                pieces.append(self.handles[file].get_slice(f"{kind}/{name}")[lo - offset:hi - offset])
                covered += hi - lo
        if covered != numel:
            raise ShardError(f"{name}: the shard files hold {covered} of elements [{start}, {start + numel}) of its "
                             f"{kind}; the checkpoint is incomplete: use an earlier one")
        if not pieces:
            return torch.empty(0)
        return torch.cat(pieces) if len(pieces) != 1 else pieces[0]

    def full(self, kind: str, name: str) -> torch.Tensor:
        shape = self.shapes[name]
        return self.read(kind, name, 0, int(torch.Size(shape).numel())).view(shape)


def _load_z3(param, name: str, reader: ShardReader, rank: int) -> None:
    """This rank's ZeRO-3 partition: the module's 16-bit copy and, when trained, fp32 master and moments."""
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    offset, valid, size = _z3_range(param, rank)
    value = reader.read("param", name, offset, valid)
    param.ds_tensor.data.flatten()[:valid].copy_(value)
    if not param.requires_grad:
        return
    for kind in KINDS:
        padded = torch.zeros(size, dtype=torch.float32, device=param.ds_tensor.device)
        padded[:valid] = value if kind == "param" else reader.read(kind, name, offset, valid)
        if kind == "param":
            safe_set_local_fp32_param(param, padded)
        else:
            safe_set_local_optimizer_state(param, padded, kind)


def _load_z12(param, name: str, reader: ShardReader) -> None:
    """ZeRO-1/2: the full module copy (replicated) and this rank's fragment of master and moments."""
    full = reader.full("param", name)
    param.data.copy_(full.to(param.device, param.dtype))
    mapping = getattr(param, "_hp_mapping", None)
    if not param.requires_grad or mapping is None or not mapping.lp_fragment_address.numel:
        return
    start, numel = mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel
    mapping.get_hp_fragment().data.copy_(full.flatten()[start:start + numel])
    for key in ADAM_STATE:
        mapping.get_optim_state_fragment(key).data.copy_(reader.read(key, name, start, numel))


def load_shards(named_params: list, reader: ShardReader, torch_optimizer) -> None:
    """Fill this rank's partitions from a sharded checkpoint written on any world size. Local.

    Every trained parameter must be in the checkpoint with its optimizer state and its shape;
    frozen ones are loaded when the checkpoint holds them (``trainable_only: false``).
    """
    rank, _ = _rank_world()
    missing = [n for n, p in named_params if p.requires_grad and not reader.trained.get(n)]
    if missing:
        raise ShardError(f"the checkpoint holds no trained state for parameters {missing[:3]}; "
                         "was it written with another freeze map?")
    for name, param in named_params:
        if name not in reader.shapes:
            continue
        if reader.shapes[name] != full_shape(param):
            raise ShardError(f"{name}: shape {reader.shapes[name]} in the checkpoint, {full_shape(param)} in the model")
        if hasattr(param, "ds_id"):
            _load_z3(param, name, reader, rank)
        else:
            _load_z12(param, name, reader)
    set_adam_step(torch_optimizer, reader.adam_step)
