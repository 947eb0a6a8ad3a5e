"""Device meshes and where every array lives on them: JAX's own sharding (`jax.sharding`), no distribution layer.

A mesh has three named axes (`AXES`): "data" (the batch split, weights replicated), "fsdp" (the batch split too,
and every weight split along one of its axes, gathered by XLA when a layer needs it) and "tensor" (the
column- and row-parallel halves of the attention and MLP products). `make_mesh("data=2,fsdp=4")` builds one from
what a user asks for (axes left out are 1; nothing asked: every device to fsdp). The batch is split over
("data", "fsdp") (`BATCH_AXES`), so `per_device_train_batch_size` keeps HF's meaning: samples per data x fsdp
coordinate.

Where a weight lives is decided per array leaf of the model's state (`leaf_spec`), from its param path (the
HF-mirrored name) and the family's rules (`VisionLanguageModel.sharding_rules()`, regexes on the path, first
match wins), else the generic default: the stacked layer axes (a scan slices them) are never split; with a tensor
axis, the weights of column-parallel Linears (q/k/v, gate/up, fc1, ...) are split along their output axis and those
of row-parallel ones (o, down, fc2, ...) along their input axis; then the largest remaining axis that the fsdp size
divides is split over "fsdp". NF4's packed codes and block statistics are flat per weight (row-major [out, in]), so
an even split of them is a split along the output axis: no device holds a whole layer (column-parallel ones are
split over tensor x fsdp, row-parallel ones over fsdp only). A LoRA's factors and the optimizer state (arrays of
the same shapes as the trainable leaves) follow the same rule. A leaf no axis of which divides stays replicated.
Placement never changes results: jit computes the same function on any sharding (the tests compare losses across
meshes); it decides memory and communication.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxvlm.paths import stacked_prefix

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
# Linear leaf names whose products are split by output (column-parallel) or by input (row-parallel) on "tensor".
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "gate_up_proj", "qkv", "fc1", "linear_fc1",
                   "query", "key", "value")
# NF4's flat per-weight arrays (jaxvlm.quant.NF4): the packed codes and the block statistics.
NF4_FLAT = ("codes", "absmax", "nested_absmax")
ROW_PARALLEL = ("o_proj", "down_proj", "out_proj", "fc2", "proj", "linear_fc2", "dense")


def parse_mesh(spec) -> dict[str, int]:
    """{axis: size} from "data=2,fsdp=4", a mapping, or None (empty: the default); ValueError naming what is wrong."""
    if spec is None or spec == "":
        return {}
    if isinstance(spec, str):
        items = {}
        for part in spec.split(","):
            name, eq, value = part.strip().partition("=")
            if not eq or not value.strip().isdigit():
                raise ValueError(f"mesh {spec!r}: expected comma-separated axis=size pairs, e.g. 'data=2,fsdp=4' "
                                 f"(axes {', '.join(AXES)})")
            if name.strip() in items:
                raise ValueError(f"mesh {spec!r}: axis {name.strip()!r} given twice")
            items[name.strip()] = int(value)
    elif isinstance(spec, Mapping):
        items = dict(spec)
    else:
        raise ValueError(f"mesh={spec!r}: expected a string like 'data=2,fsdp=4', a dict, or None")
    for name, size in items.items():
        if name not in AXES:
            raise ValueError(f"mesh axis {name!r}: expected one of {AXES}")
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
            raise ValueError(f"mesh axis {name}={size!r}: expected a positive int")
    return {k: int(v) for k, v in items.items()}


def make_mesh(spec=None, devices=None) -> Mesh:
    """A Mesh over `devices` (default: every device of every process) with axes `AXES`. `spec` ("data=2,fsdp=4",
    a dict or None): axes left out are 1; None puts every device on "fsdp". The sizes must multiply to the number of
    devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh(spec)
    if not sizes:
        sizes = {"fsdp": len(devices)}
    shape = tuple(sizes.get(a, 1) for a in AXES)
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh {', '.join(f'{a}={s}' for a, s in zip(AXES, shape))} holds {int(np.prod(shape))} "
                         f"devices; there are {len(devices)}: the axis sizes must multiply to the device count")
    # Auto axes: jit places intermediates as XLA's sharding propagation decides (jax.make_mesh's default, explicit
    # axes, would type every array's sharding and refuse ops whose operands disagree).
    return jax.make_mesh(shape, AXES, devices=devices, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def initialize_distributed() -> bool:
    """Joins the processes of a multi-host run (`jax.distributed.initialize`) when the environment describes one;
    True if it did. Call it before anything else touches JAX (the CLIs do). One command per host, with
    JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID set, or under SLURM /
    Open MPI (several tasks), which JAX reads by itself. On CPUs the processes talk through gloo."""
    import os
    env = os.environ
    address = env.get("JAX_COORDINATOR_ADDRESS")
    tasks = max(int(env.get("SLURM_NTASKS", "1") or 1), int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1))
    if not address and tasks <= 1:
        return False
    if jax.distributed.is_initialized():
        return True
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    for key, name in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
        if env.get(name):
            if not env[name].isdigit():
                raise ValueError(f"{name}={env[name]!r}: expected a non-negative int")
            kwargs[key] = int(env[name])
    jax.distributed.initialize(address, **kwargs)
    return True


def place(x, sharding: NamedSharding) -> jax.Array:
    """`x` (a host array or an array on this process's devices) as a jax.Array with `sharding`, which may span
    several processes: each process writes only the slices its own devices hold (every process passes the same
    value)."""
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    return jax.make_array_from_callback(np.shape(x), sharding, lambda index: np.asarray(x[index]))


def mesh_size(mesh: Mesh, axes: Iterable[str]) -> int:
    return int(np.prod([mesh.shape[a] for a in axes]))


def _leaf_module(names: list[str]) -> str | None:
    """The Linear module's leaf name of a weight's path (`...self_attn.q_proj.weight.codes` -> q_proj)."""
    for i in range(len(names) - 1, 0, -1):
        if names[i] in ("weight", "kernel"):
            return names[i - 1]
    return None


def leaf_spec(names: list[str], shape: tuple[int, ...], stack_ndim: int, mesh: Mesh,
              rules: Iterable[tuple[str, tuple]] = ()) -> PartitionSpec:
    """The PartitionSpec of one array leaf: `names` its path components (param path, then the weight type's
    fields: `codes`, `absmax`, `lora_A`, `base`, ...), `stack_ndim` its leading layer axes. See the module
    docstring for the rules."""
    key = ".".join(names)
    for pattern, spec in rules:
        if re.search(pattern, key):
            return PartitionSpec(*((None,) * stack_ndim), *spec)
    axes: list = [None] * len(shape)
    fsdp, tensor = mesh.shape.get("fsdp", 1), mesh.shape.get("tensor", 1)
    field = names[-1] if names else ""
    dense = len(shape) - stack_ndim == 2 and field in ("weight", "base", "lora_A", "lora_B")
    packed = len(shape) - stack_ndim == 1 and field in NF4_FLAT
    if tensor > 1 and packed and _leaf_module(names) in COLUMN_PARALLEL and shape[-1] % tensor == 0:
        # Row-major [out, in]: an even split of the flat arrays is a split of the output rows, over tensor and then
        # fsdp. (A row-parallel weight's input axis is not contiguous in them: those are split over fsdp only.)
        axes[-1] = ("tensor", "fsdp") if fsdp > 1 and shape[-1] % (tensor * fsdp) == 0 else "tensor"
        return PartitionSpec(*axes)
    if tensor > 1 and dense:
        module = _leaf_module(names)
        out_axis, in_axis = len(shape) - 2, len(shape) - 1
        if module in COLUMN_PARALLEL and field != "lora_A" and shape[out_axis] % tensor == 0:
            axes[out_axis] = "tensor"
        elif module in ROW_PARALLEL and field != "lora_B" and shape[in_axis] % tensor == 0:
            axes[in_axis] = "tensor"
    if fsdp > 1:
        free = [i for i in range(stack_ndim, len(shape)) if axes[i] is None and shape[i] % fsdp == 0]
        if free:
            axes[max(free, key=lambda i: shape[i])] = "fsdp"
    return PartitionSpec(*axes)


def _names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def tree_shardings(tree, mesh: Mesh, stacked: Iterable = (), rules: Iterable[tuple[str, tuple]] = (),
                   prefix: str = ""):
    """A NamedSharding for every array leaf of `tree` (a model state, or any pytree whose key paths are param paths:
    typed weights opened up; `prefix`: the dotted param path of the tree's root), by `leaf_spec`. Leaves under a
    stacked prefix have one leading layer axis (experts one more: an `Experts` weight's own axis is kept whole too)."""
    stacked, rules, root = tuple(stacked), tuple(rules), prefix.split(".") if prefix else []

    def sharding(path, leaf):
        names = [n for n in root + _names(path) if n not in ("value", "raw_value")]  # nnx's Variable field
        stack = 0
        if stacked_prefix(".".join(names), stacked) is not None:
            stack = 2 if "experts" in names else 1
        stack = min(stack, max(np.ndim(leaf) - 1, 0))
        return NamedSharding(mesh, leaf_spec(names, np.shape(leaf), stack, mesh, rules))
    return jax.tree_util.tree_map_with_path(sharding, tree)


def model_shardings(model, mesh: Mesh):
    """The NamedSharding of every array leaf of `model`'s state (nnx.split order), from its family's rules."""
    from flax import nnx
    _, state = nnx.split(model)
    return tree_shardings(state, mesh, model.stacks(), model.sharding_rules())


def shard_model(model, mesh: Mesh):
    """`model` with every array placed by `model_shardings` (each device receives only its slices)."""
    from flax import nnx
    graphdef, state = nnx.split(model)
    shardings = tree_shardings(state, mesh, model.stacks(), model.sharding_rules())
    state = jax.tree.map(place, state, shardings)
    return nnx.merge(graphdef, state)  # the module's plain attributes (the user's settings) ride in graphdef


def optimizer_shardings(tx, params: list, mesh: Mesh):
    """Where `tx.init(params)`'s arrays live: an array of its param's shape (Adam's moments) where the param is,
    any other one (a step count, 8-bit moments' codes and scales) by the generic rule on its shape alone."""
    import optax
    shapes = jax.eval_shape(tx.init, params)

    def generic(leaf):
        return NamedSharding(mesh, leaf_spec([], leaf.shape, 0, mesh))

    def like_param(leaf, param):
        return param.sharding if leaf.shape == param.shape and isinstance(param, jax.Array) else generic(leaf)
    return optax.tree_map_params(tx, like_param, shapes, params, transform_non_params=generic,
                                 is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))


def batch_sharding(array, batch: int, mesh: Mesh) -> NamedSharding:
    """Where one model input lives: split over `BATCH_AXES` along its batch axis (the first of its first two axes of
    size `batch`: Qwen's position_ids are [3, batch, seq]), else replicated (packed arrays such as image patches,
    whose rows belong to several samples)."""
    shape = np.shape(array)
    n = mesh_size(mesh, BATCH_AXES)
    for axis in range(min(2, len(shape))):
        if shape[axis] == batch and batch % n == 0:
            return NamedSharding(mesh, PartitionSpec(*((None,) * axis), BATCH_AXES))
    return NamedSharding(mesh, PartitionSpec())


def local_shards(mesh: Mesh) -> list[int]:
    """The data x fsdp coordinates (row-major: the order in which a batch split over `BATCH_AXES` is dealt out) that
    this process's devices hold."""
    devices = mesh.devices  # [data, fsdp, tensor]
    return sorted({d * devices.shape[1] + f for (d, f, _), device in np.ndenumerate(devices)
                   if device.process_index == jax.process_index()})


def place_shards(inputs: dict[str, np.ndarray], shards: list[int], mesh: Mesh) -> dict[str, jax.Array]:
    """Per-shard model inputs `[len(shards), ...]` (row i: data x fsdp coordinate `shards[i]`, this process's, as
    `local_shards` gives them) as global arrays `[data x fsdp, ...]` whose leading axis is split over `BATCH_AXES`:
    each device receives its own shard's row only."""
    n = mesh_size(mesh, BATCH_AXES)
    sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    row = {shard: i for i, shard in enumerate(shards)}

    def put(x):
        return jax.make_array_from_callback((n, *x.shape[1:]), sharding,
                                            lambda index: x[row[index[0].start or 0]][None])
    return {k: put(np.asarray(v)) for k, v in inputs.items()}


def shard_batch(inputs: dict, batch: int, mesh: Mesh) -> dict:
    """The model inputs placed on the mesh (`batch_sharding` each)."""
    return {k: place(np.asarray(v), batch_sharding(v, batch, mesh)) for k, v in inputs.items()}


def as_mesh(spec) -> Mesh:
    """A Mesh with axes `AXES`: a jax Mesh as given, anything else by `make_mesh`; ValueError for a Mesh whose axes
    are named otherwise."""
    if isinstance(spec, Mesh):
        if tuple(spec.axis_names) != AXES:
            raise ValueError(f"mesh axes {tuple(spec.axis_names)}: expected {AXES} (jaxvlm.sharding.make_mesh builds "
                             f"one)")
        return spec
    return make_mesh(spec)


def lives_on(tree, mesh: Mesh) -> bool:
    """Whether every array leaf of `tree` (a model state, any pytree) is placed on `mesh`."""
    return all(isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh
               for x in jax.tree.leaves(tree))


def cache_sharding(array, batch: int, mesh: Mesh) -> NamedSharding:
    """Where one generation-cache array lives. An array of 4 or more axes holds keys or values, `[..., batch, slots,
    kv_heads, head_dim]` (stacked layer axes first): its batch axis is split over `BATCH_AXES` when they divide the
    batch, its kv heads over "tensor" when it divides them. Any other array (a per-sample mask) by `batch_sharding`."""
    shape = np.shape(array)
    if len(shape) < 4:
        return batch_sharding(array, batch, mesh)
    axes: list = [None] * len(shape)
    if shape[-4] == batch and batch % mesh_size(mesh, BATCH_AXES) == 0:
        axes[-4] = BATCH_AXES
    if shape[-2] % mesh.shape["tensor"] == 0:
        axes[-2] = "tensor"
    return NamedSharding(mesh, PartitionSpec(*axes))


def cache_shardings(cache, batch: int, mesh: Mesh):
    """A NamedSharding for every array of a generation cache (a family's `init_cache` pytree), by `cache_sharding`."""
    return jax.tree.map(lambda x: cache_sharding(x, batch, mesh), cache)


def param_shardings(key: str, value, mesh: Mesh, stacked: Iterable = (), rules: Iterable[tuple[str, tuple]] = ()):
    """The NamedSharding of every array leaf of one param's `value` (an array, a ShapeDtypeStruct or a typed weight
    such as an NF4) at the dotted param path `key`: what `tree_shardings` gives that leaf inside its model's state."""
    return tree_shardings(value, mesh, stacked, rules, prefix=key)
