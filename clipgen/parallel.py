"""Device mesh, parameter sharding and multi-host start-up, all from the config.

The mesh has axes ('data', 'fsdp', 'tensor'). Kernels carry logical axis names
(`nn.with_logical_partitioning`); the config's rule table maps those names to mesh axes,
and parameters without names fall back to FSDP over their largest divisible dimension.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import linen as nn
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
# Logical names used by clipgen's modules, and where they go by default.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("conv_out", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),  # the stacked axis of scanned blocks (clipgen.models.layers)
)

TPU_COORDINATOR_PORT = 8476  # JAX's coordinator port on TPU pods (JAX_COORDINATOR_PORT wins)
_distributed_initialized = False


def initialize_distributed(config: ml_collections.ConfigDict | None = None) -> bool:
    """Start multi-host JAX once, before anything touches a device; returns whether it did.

    Explicit settings win (`config.distributed.coordinator_address`, `num_processes`,
    `process_id`, or JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID); then a pod
    slice's worker environment (TPU_WORKER_HOSTNAMES and TPU_WORKER_ID: the first worker
    coordinates, as JAX's own TPU cluster does); otherwise a Cloud TPU pod slice or a SLURM
    job with more than one task is detected and JAX's own cluster detection fills in the
    rest. A single host does nothing.
    """
    global _distributed_initialized
    if _distributed_initialized:
        return True
    settings = dict(config.get("distributed", {})) if config is not None else {}
    address = settings.get("coordinator_address") or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num_processes = settings.get("num_processes") or os.environ.get("JAX_NUM_PROCESSES")
    process_id = settings.get("process_id")
    if process_id is None and "JAX_PROCESS_ID" in os.environ:
        process_id = int(os.environ["JAX_PROCESS_ID"])
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")
    single_slice = os.environ.get("MEGASCALE_COORDINATOR_ADDRESS") is None
    if not address and len(hosts) > 1 and "TPU_WORKER_ID" in os.environ and single_slice:
        port = os.environ.get("JAX_COORDINATOR_PORT", TPU_COORDINATOR_PORT)
        address = f"{hosts[0]}:{port}"
        num_processes, process_id = len(hosts), int(os.environ["TPU_WORKER_ID"])
    kwargs: dict[str, Any] = {}
    if address:
        if num_processes is None or process_id is None:
            raise ValueError(
                "a coordinator address was given without num_processes and process_id; "
                "set config.distributed.* or JAX_NUM_PROCESSES and JAX_PROCESS_ID"
            )
        kwargs = dict(
            coordinator_address=address,
            num_processes=int(num_processes),
            process_id=int(process_id),
        )
        if settings.get("local_device_ids") is not None:
            kwargs["local_device_ids"] = list(settings["local_device_ids"])
    elif not (_on_tpu_pod() or int(os.environ.get("SLURM_NTASKS", "1")) > 1):
        return False
    jax.distributed.initialize(**kwargs)
    _distributed_initialized = True
    logging.info(
        "jax.distributed: process %d of %d, %d local devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
    )
    return True


def _on_tpu_pod() -> bool:
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS") is not None


def mesh_shape(mesh_config: dict[str, int], device_count: int) -> tuple[int, ...]:
    """Sizes of ('data', 'fsdp', 'tensor'), with at most one -1 taking the remaining devices."""
    unknown = set(mesh_config) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"config.mesh has unknown axes {sorted(unknown)}; axes are {MESH_AXES}")
    sizes = [int(mesh_config.get(axis, 1)) for axis in MESH_AXES]
    fill = [i for i, size in enumerate(sizes) if size == -1]
    if len(fill) > 1:
        raise ValueError(f"config.mesh may use -1 for one axis only, got {dict(mesh_config)}")
    known = math.prod(size for size in sizes if size != -1)
    if fill:
        if device_count % known:
            raise ValueError(
                f"config.mesh {dict(mesh_config)}: {device_count} devices do not divide by {known}"
            )
        sizes[fill[0]] = device_count // known
    if math.prod(sizes) != device_count:
        raise ValueError(
            f"config.mesh {dict(mesh_config)} needs {math.prod(sizes)} devices; "
            f"there are {device_count}"
        )
    return tuple(sizes)


def make_mesh(mesh_config: dict[str, int], devices: Sequence[Any] | None = None) -> Mesh:
    """The device mesh. Several slices (devices with distinct `slice_index`) put the
    cross-slice (DCN) dimension on 'data', the rest within each slice (ICI)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    slices = {getattr(device, "slice_index", 0) for device in devices}
    if len(slices) > 1:
        if shape[0] % len(slices):
            raise ValueError(
                f"{len(slices)} slices need the data axis ({shape[0]}) to be a multiple of them"
            )
        ici = (shape[0] // len(slices), shape[1], shape[2])
        dcn = (len(slices), 1, 1)
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    else:
        try:
            grid = mesh_utils.create_device_mesh(shape, devices)
        except (ValueError, NotImplementedError, AssertionError):
            grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def logical_rules(config: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
    """The config's logical-axis rules as the tuple flax expects."""
    rules = config.get("sharding_rules", DEFAULT_RULES)
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


def fsdp_spec(shape: Sequence[int], mesh: Mesh, min_size: int) -> PartitionSpec:
    """Shard the largest dimension divisible by the 'fsdp' axis; small arrays stay replicated."""
    fsdp = mesh.shape["fsdp"]
    if fsdp == 1 or math.prod(shape) < min_size:
        return PartitionSpec()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return PartitionSpec(*spec)
    return PartitionSpec()


def tree_shardings(
    abstract_tree: Any,
    mesh: Mesh,
    rules: Sequence[tuple[str, Any]],
    fsdp_min_size: int = 2**14,
) -> Any:
    """NamedShardings for a tree that may hold `nn.LogicallyPartitioned` boxes (as
    `jax.eval_shape(init)` returns): named axes through the rules, FSDP for the rest."""

    def leaf_sharding(leaf):
        if isinstance(leaf, nn.LogicallyPartitioned):
            if not hasattr(leaf.value, "shape"):  # optax's MaskedNode: a frozen leaf's state
                return leaf.value
            spec = nn.logical_to_mesh_axes(leaf.names, rules)
            return NamedSharding(mesh, _drop_indivisible(spec, leaf.value.shape, mesh))
        return NamedSharding(mesh, fsdp_spec(leaf.shape, mesh, fsdp_min_size))

    return jax.tree_util.tree_map(
        leaf_sharding, abstract_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
    )


def _drop_indivisible(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Replicate dimensions the named mesh axes do not divide (a small test model, say)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(mesh.shape[name] for name in names)
        out.append(axes if size > 1 and dim % size == 0 else None)
    return PartitionSpec(*out)


def abstract_sharded(
    init_fn: Callable[..., Any],
    mesh: Mesh,
    rules: Sequence[tuple[str, Any]],
    *args: Any,
    fsdp_min_size: int = 2**14,
) -> tuple[Any, Any]:
    """What `init_fn(*args)` would return, as ShapeDtypeStructs carrying their shardings
    (partitioning boxes removed), and the shardings themselves. Nothing is computed."""
    abstract = jax.eval_shape(init_fn, *args)
    shardings = tree_shardings(abstract, mesh, rules, fsdp_min_size)
    abstract = nn.meta.unbox(abstract)
    shaped = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
    )
    return shaped, shardings


def init_onto(
    init_fn: Callable[..., Any],
    mesh: Mesh,
    rules: Sequence[tuple[str, Any]],
    shardings: Any,
    *args: Any,
) -> Any:
    """Run `init_fn(*args)` under jit straight onto `shardings` (from `abstract_sharded`),
    so no device ever holds the whole tree; partitioning boxes are removed."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return jax.jit(lambda *inner: nn.meta.unbox(init_fn(*inner)), out_shardings=shardings)(
            *args
        )


def put_host_tree(tree: Any, shardings: Any) -> Any:
    """Host arrays (the same in every process) as global jax.Arrays on `shardings`: each
    device gets only its slice."""

    def put(value, sharding):
        value = np.asarray(value)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree_util.tree_map(put, tree, shardings)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """The batch dimension split over ('data', 'fsdp'); other dimensions replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def global_batch(local_batch: Any, mesh: Mesh) -> Any:
    """A global, batch-sharded jax.Array tree from this process's slice of the batch."""
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(x)), x),
        local_batch,
    )
