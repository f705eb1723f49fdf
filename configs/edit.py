"""DiffusionCLIP edits: a diffusion UNet fine-tuned so that generating from the DDIM inversion
of an image moves it along the CLIP direction from `edit.source` to `edit.target`
(clipgen.edit, clipgen.train.edit).

`--config=configs/edit.py:<preset>[,<source>,<target>]`. Presets:
  tiny   a few steps on a tiny random UNet and a random tiny CLIP at 16 px, for tests;
  demo   the shapes world: the unconditional `unet` demo run (workdir/demo/unet) edited
         with the demo CLIP (workdir/demo/clip), on 64 training-split scenes whose caption
         holds the source word, scored by the `edit_oracle` evaluator on held-out scenes;
  paper  DiffusionCLIP's README recipe at 256 px on a public DDPM (a diffusers
         google/ddpm-celebahq-256 directory in `base.source`, the `unet` paper preset's
         shape): t0 500, S_inv 40, S_gen 6, S_test 40, 50 images x 5 epochs, batch 1, Adam
         lr 8e-6 growing 1.3x an epoch, w_clip 3, w_L1 1, w_ID 0, the 79 ImageNet
         templates, a converted ViT-B/16 CLIP (`clip.path`), exact fine-tuning.

The official code's choices are the defaults wherever they exist: the -log((1 + cos) / 2)
CLIP loss (`edit.clip_loss`: "official" or the paper's "paper"), deterministic DDIM on
int(linspace(0, 1, S) * t0), a fresh model and optimizer per edit.
"""

from clipgen import build
from clipgen import config as config_lib

# The trainable kernels LoRA adapts: the UNet's convolutions and attention projections.
LORA_TARGETS = r"(.*/)?(down|mid|up)\w*/(conv1|conv2|query|key|value|out)/kernel"


def get_config(arg: str | None = None):
    preset, *words = (arg or "demo").split(",")
    if len(words) not in (0, 2):
        raise ValueError("configs/edit.py: give <preset> or <preset>,<source>,<target>")
    config = config_lib.base_config()
    config.stage = "edit"
    # What to fine-tune: a clipgen `unet` or `decoder` run (its `preset` for a checkpoint
    # storing no config), a diffusers UNet2DModel directory (then `diffusion` below is its
    # process), or "random" (`model` below; tests). A decoder is run on its unconditional
    # branch ("none") or on each input's CLIP image embedding ("image").
    config.base = dict(source="workdir/demo/unet", preset="demo", condition="none")
    unet = config_lib.load_preset("unet", "tiny" if preset == "tiny" else "demo")
    config.model = unet.model.to_dict()
    config.diffusion = unet.diffusion.to_dict()
    config.clip = dict(build.CLIP_SOURCE, workdir="workdir/demo/clip")

    config.edit = dict(
        source="red",
        target="blue",
        templates="shapes",  # "shapes" (captions holding the word), "imagenet" (79), "plain"
        num_templates=32,
        t0=500,
        inv_steps=40,  # S_inv
        inv_refine=0,  # fixed-point iterations per inversion step (DiffusionCLIP: none)
        gen_steps=6,  # S_gen, while fine-tuning
        test_steps=40,  # S_test, when editing
        mode="exact",  # or "efficient": an optimizer step at each of the S_gen steps
        remat=True,  # exact mode: a jax.checkpoint per generation step
        # Exact mode: the generation steps unrolled instead of one scan (see the demo preset);
        # unrolled, the 256 px step's peak memory grew from 5.43 to 19.75 GiB
        # (benchmarks/edit.py memory --modes exact exact_unrolled --dtypes float32).
        unroll=False,
        clip_loss="official",  # -log((1 + cos) / 2); "paper": 1 - cos
        clip_blur=0.0,  # sigma (pixels) of a gaussian blur on both images the CLIP loss reads
        clip_weight=3.0,
        l1_weight=1.0,
        id_weight=0.0,
        identity="clip",  # "clip" image embeddings, or "module:function" (images -> features)
        epochs=5,
        cache="",  # a directory for inverted latents ("": memory only)
    )
    config.lora = dict(rank=0, alpha=1.0, targets=LORA_TARGETS)
    # Training images: shapes-world scenes of `split` whose caption holds edit.source, or
    # every image of `folder`.
    config.data = dict(folder="", split="train", num_train=64, resolution=32, seed=0)
    config.evals.oracle = dict(
        type="edit_oracle", split="heldout", num_examples=200, batch_size=50, seed=0
    )

    config.optim.lr = 2e-4
    config.optim.b2 = 0.999
    config.optim.weight_decay = 0.0
    config.optim.grad_clip = 0.0
    config.optim.warmup_steps = 0
    config.optim.schedule = "step"  # torch's StepLR: lr x step_factor every step_every steps
    config.optim.step_factor = 1.3
    config.optim.ema_decays = (1e-6,)  # no averaging: the EMA is the fine-tuned model
    config.batch_size = 8
    config.checkpoint.every = 1000
    config.checkpoint.keep = 1
    config.log_every = 8
    config.eval_every = 0

    if preset == "tiny":
        config.base.source = "random"
        config.clip = dict(build.CLIP_SOURCE, source="random", preset="tiny")
        config.edit.update(t0=300, inv_steps=5, gen_steps=3, test_steps=5, num_templates=4)
        config.data.update(num_train=8, resolution=16)
        config.evals.oracle.update(num_examples=8, batch_size=8)
        config.batch_size = 8  # one image a device on the tests' 8 fake devices
    elif preset == "paper":
        config.base = dict(source="ddpm-celebahq-256", preset="paper", condition="none")
        paper = config_lib.load_preset("unet", "paper")
        config.model = paper.model.to_dict()
        config.diffusion = paper.diffusion.to_dict()
        config.clip = dict(build.CLIP_SOURCE, source="transformers", path="clip-vit-base-patch16")
        config.edit.update(
            source="face", target="angry face", templates="imagenet", num_templates=79
        )
        config.data.update(folder="celeba_hq_test", num_train=50, resolution=256)
        config.evals = {}
        config.optim.lr = 8e-6
        config.batch_size = 1
        config.model.dtype = "float32"
    elif preset == "demo":
        # XLA:CPU took 20x as long for the gradient of the generation steps as one scan:
        # 31.6 s against 1.5 s an exact step (benchmarks/edit.py speed, exact_rolled / exact).
        config.edit.unroll = True
    else:
        raise ValueError(f"configs/edit.py: unknown preset {preset!r} (tiny, demo, paper)")
    if words:
        config.edit.source, config.edit.target = words
    steps_per_epoch = -(-config.data.num_train // config.batch_size)
    if config.edit.mode == "efficient":
        steps_per_epoch *= config.edit.gen_steps
    config.optim.step_every = steps_per_epoch
    config.total_steps = config.edit.epochs * steps_per_epoch
    return config
