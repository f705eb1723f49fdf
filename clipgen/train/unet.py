"""The unconditional UNet stage: images -> a DDPM (configs/unet.py), the backbone DiffusionCLIP
edits. It trains on the shapes world's renders at `data.resolution`, or on a folder of
images (`data.folder`, read once, resized and centre-cropped), with the process's loss
(eps MSE, plus the VLB term for a learned variance)."""

from __future__ import annotations

from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clipgen import build, sampling
from clipgen.data import files, pipeline
from clipgen.data.preprocess import to_unit_range
from clipgen.models.unet import init_unet
from clipgen.train.loop import Stage


class _Folder:
    """A folder of images as an example source (image at the stage's resolution, id)."""

    def __init__(self, folder: str, size: int):
        _, self.images = files.read_images(folder, size)
        self.key = f"image_{size}"

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {self.key: self.images[index], "id": int(index)}


def make_stage(config: ml_collections.ConfigDict) -> Stage:
    module = build.module(config)
    diffusion = build.diffusion(config)
    size, data = config.data.resolution, config.data
    if data.folder:
        source = _Folder(data.folder, size)
    else:
        source = pipeline.ProceduralShapes((size,), "train", data.seed)
    key = f"image_{size}"

    def to_batch(examples: list[dict]) -> dict[str, np.ndarray]:
        return {"image": to_unit_range(np.stack([e[key] for e in examples]))}

    def batches(first_batch: int, global_batch_size: int) -> Iterator[dict]:
        return pipeline.host_batches(source, to_batch, first_batch, global_batch_size, config.seed)

    def batch_spec(global_batch_size: int):
        return {"image": jax.ShapeDtypeStruct((global_batch_size, size, size, 3), jnp.float32)}

    def init_params(rng):
        return init_unet(module, rng, size)["params"]

    def loss(params, batch, rng):
        t_rng, noise_rng, dropout_rng = jax.random.split(rng, 3)
        x0 = batch["image"]

        def model_fn(x_t, t):
            return module.apply(
                {"params": params}, x_t, t, deterministic=False, rngs={"dropout": dropout_rng}
            )

        t = diffusion.sample_timesteps(t_rng, x0.shape[0])
        noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
        losses = diffusion.training_losses(model_fn, x0, t, noise)
        return losses["loss"].mean(), {"mse": losses["mse"].mean()}

    program = jax.jit(
        lambda params, rng: sampling.to_uint8(
            sampling.sample_unet(
                module,
                params,
                build.diffusion(config, config.sample.respacing),
                rng,
                8,
                size,
                method=config.sample.method,
            )
        )
    )

    def preview(state) -> dict[str, np.ndarray]:
        images = np.asarray(program(next(iter(state.ema.values())), jax.random.key(0)))
        return {"samples": np.concatenate(list(images), axis=1)[None]}

    return Stage("unet", init_params, loss, batches, batch_spec, preview=preview)
