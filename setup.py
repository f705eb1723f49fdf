"""clipgen: image generation from CLIP latents in JAX (unCLIP, pOps, DiffusionCLIP)."""

import re
from pathlib import Path

from setuptools import find_packages, setup

VERSION = re.search(
    r'__version__ = "([^"]+)"',
    Path(__file__).with_name("clipgen").joinpath("__init__.py").read_text(),
).group(1)

# Pinned to the set that installs together on Python 3.11 (see shared/reference/stack.md):
# jax 0.10.x is the last series for 3.11.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "clu==0.0.12",
    "ml_collections==1.1.0",
    "absl-py>=2.1",
    "tensorflow-datasets==4.9.10",
    "array_record==0.8.6",
    # tfds resolves its package resources through it but does not declare it.
    "importlib_resources>=6",
    "grain==0.2.18",
    # clu's metric writers and periodic actions import TensorFlow and TensorBoard.
    "tensorflow-cpu==2.21.0",
    "tensorboard==2.21.0",
    "transformers==5.23.0",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "pillow==13.0.0",
    "numpy>=2.0,<3",
    "scipy>=1.14",
    "tqdm>=4.66",
]

TEST_REQUIRES = [
    "pytest>=8",
    "pytest-xdist==3.8.0",  # launch/test.sh runs the suite on two workers
    "ruff==0.17.6",
    # Exactly 2.13.0: the CPU wheel pip finds locally. Any range pulls a multi-GB CUDA build.
    # Never torchvision: it does not import beside this torch.
    "torch==2.13.0",
    "diffusers==0.42.1",
]

setup(
    name="clipgen",
    version=VERSION,
    description=__doc__,
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.12",
    # The stage configs live at the top of the checkout (configs/) and ship as
    # clipgen.configs, so that an installed clipgen finds its presets anywhere.
    packages=[*find_packages(include=["clipgen", "clipgen.*"]), "clipgen.configs"],
    package_dir={"clipgen.configs": "configs"},
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": TEST_REQUIRES},
    entry_points={"console_scripts": ["clipgen=clipgen.cli:run"]},
)
