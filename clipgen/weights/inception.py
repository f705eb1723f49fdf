"""FID Inception weights: the `pt_inception-2015-12-05` state dict of pytorch-fid and
torch-fidelity (`weights-inception-2015-12-05-6726825d.pth`), read from safetensors, or from
the .pth through `torch.load(weights_only=True)`, into `FIDInception` params.

Loading is strict: every tensor but the `num_batches_tracked` counters must land in a
parameter and every parameter must be filled, with matching shapes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import linen as nn
from flax import traverse_util

from clipgen.data.files import atomic_write
from clipgen.models.inception import FIDInception, init_inception
from clipgen.weights.convert import Rule, fill_params, read_safetensors, read_torch_state_dict

_BN_NAMES = {
    "bn.weight": "scale",
    "bn.bias": "bias",
    "bn.running_mean": "mean",
    "bn.running_var": "var",
}


def _ignored(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def _abstract_params(module: FIDInception) -> dict[str, Any]:
    abstract = jax.eval_shape(
        lambda rng: nn.meta.unbox(init_inception(module, rng)), jax.random.key(0)
    )
    return abstract["params"]


def inception_rules(abstract_params: dict[str, Any]) -> list[Rule]:
    """The name map: every ConvBN `<block>.<name>` takes `<block>.<name>.conv.weight` and
    `<block>.<name>.bn.{weight,bias,running_mean,running_var}`; `fc` takes `fc.{weight,bias}`."""
    rules = [
        Rule("fc.weight", "linear", (("fc", "kernel"),)),
        Rule("fc.bias", "copy", (("fc", "bias"),)),
    ]
    conv_blocks = sorted(
        path[:-2]
        for path in traverse_util.flatten_dict(abstract_params)
        if path[-2:] == ("conv", "kernel")
    )
    for block in conv_blocks:
        prefix = ".".join(block)
        rules.append(Rule(f"{prefix}.conv.weight", "conv", (block + ("conv", "kernel"),)))
        for torch_name, flax_name in _BN_NAMES.items():
            rules.append(Rule(f"{prefix}.{torch_name}", "copy", (block + ("bn", flax_name),)))
    return rules


def read_inception_checkpoint(path: str | Path) -> dict[str, np.ndarray]:
    """The state dict as numpy arrays, from a .safetensors file or a torch .pth file (read
    with `weights_only=True`: tensors only, no code is unpickled)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    return read_torch_state_dict(
        path, "pytorch-fid's or torch-fidelity's pt_inception-2015-12-05 weights"
    )


def _fill(module: FIDInception, tensors: dict[str, np.ndarray], source: str) -> dict[str, Any]:
    abstract = _abstract_params(module)
    return fill_params(
        abstract, inception_rules(abstract), tensors, _ignored, source, "FIDInception"
    )


def load_inception(
    path: str | Path, input_scaling: str = "tf", dtype: Any = jnp.float32
) -> tuple[FIDInception, dict[str, Any]]:
    """(module, {"params": ...}) from the FID Inception state dict in a .safetensors or .pth
    file; `input_scaling` is "tf" (TTUR, torch-fidelity, clean-fid) or "pytorch_fid"."""
    module = FIDInception(input_scaling=input_scaling, dtype=dtype)
    return module, _fill(module, read_inception_checkpoint(path), str(path))


def convert_inception(
    pth_path: str | Path, safetensors_out: str | Path, overwrite: bool = False
) -> Path:
    """Check that the .pth state dict fits `FIDInception`, then write it as safetensors
    (atomically), so later loads need neither torch nor pickle. Returns the output path."""
    out = Path(safetensors_out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
    tensors = read_inception_checkpoint(pth_path)
    _fill(FIDInception(), tensors, str(pth_path))
    payload = safetensors.numpy.save(
        {key: np.ascontiguousarray(value) for key, value in tensors.items()},
        metadata={"source": Path(pth_path).name, "format": "pt_inception-2015-12-05"},
    )
    return atomic_write(out, lambda file: file.write(payload))


def params_sha256(params: dict[str, Any]) -> str:
    """A hash of the parameter values (names, shapes, float32 bytes) for statistics metadata:
    the same for a .pth and its safetensors conversion."""
    digest = hashlib.sha256()
    flat = traverse_util.flatten_dict(params.get("params", params))
    for path in sorted(flat):
        value = np.ascontiguousarray(np.asarray(flat[path], np.float32))
        digest.update("/".join(path).encode())
        digest.update(str(value.shape).encode())
        digest.update(value.tobytes())
    return digest.hexdigest()
