"""pOps operators: a diffusion prior fine-tuned so that input image embeddings (and an
instruction's tokens) take the place of its text (clipgen.operators).

`--config=configs/operator.py:<preset>[,<operator>]`; operators union (default), recolour,
scene, instruct, with pOps' drops and guidance (clipgen.operators.OPERATORS). Presets:
  tiny   a few steps on a tiny random prior (init.prior = "random"), for tests;
  demo   from the demo cascade's prior (workdir/demo/prior), on shapes-world operator data
         embedded with the demo CLIP;
  bench  the prior's benchmark size (width 512, 6 layers, 77 tokens, 512-d) on synthetic
         union data, batch 32, from a random prior: benchmarks/operator_step.py;
  paper  the Kandinsky 2.2 prior's size (20 layers x 2048, 1280-d, 77 tokens; 1B
         parameters) as pOps fine-tunes it: AdamW 1e-5 constant, betas (0.9, 0.999), no
         weight decay, clip 1.0, FSDP; `init.prior` a converted Kandinsky 2.2 prior
         directory, `init.weights` an operator's learned_prior.pth to start from.
"""

import dataclasses

from clipgen import config as config_lib
from clipgen import operators


def get_config(arg: str | None = None):
    preset, _, operator = (arg or "demo").partition(",")
    operator = operator or "union"
    if operator not in operators.OPERATORS:
        raise ValueError(
            f"configs/operator.py: unknown operator {operator!r} ({', '.join(operators.OPERATORS)})"
        )
    config = config_lib.load_preset("prior", "demo" if preset == "tiny" else preset)
    synthetic = preset in ("tiny", "bench")
    config.stage = "operator"
    config.operator = dataclasses.asdict(operators.OPERATORS[operator])

    # What to fine-tune: a clipgen prior run, a diffusers PriorTransformer directory, or
    # "random" (tests); `weights` an operator state dict (pOps' learned_prior.pth) over it.
    config.init = dict(prior="workdir/demo/prior", weights="")
    # LoRA adapters on the attention and MLP kernels instead of the whole prior (rank 0:
    # off), or only the first `train_blocks` blocks (0: all), as pOps' "<k>_layers" mode.
    config.lora = dict(rank=0, alpha=1.0, targets=r"block_\d+/(attn|mlp)/.*")
    config.train_blocks = 0

    config.diffusion = dict(schedule="cosine", timesteps=1000, prediction="x0")
    config.sample = dict(
        respacing="25",
        method="ddpm",
        eta=0.0,
        guidance_scale=config.operator.get_ref("guidance"),
        best_of=1,
        clip_denoised=None,
    )
    config.data = dict(
        operator=operator,
        embeddings=f"workdir/demo/operators/{operator}",
        clip_workdir="workdir/demo/clip",
        clip_preset="demo",
        num_examples=dict(train=4000, test=200, heldout=200),
        normalize=True,  # L2-normalise the CLIP embeddings first (clipgen's priors do)
        seed=0,
    )
    config.evals = dict(
        retrieval=dict(
            type="operator_retrieval",
            splits=("test", "heldout"),
            num_examples=200,
            batch_size=200,
            seed=0,
            cascade="",  # a workdir with decoder and upsampler runs: also render and score
            oracle_examples=32,  # of each split, rendered 3 times (output, baseline, truth)
            oracle_resolution=64,
        )
    )

    config.optim.lr = 1e-4
    config.optim.b2 = 0.999
    config.optim.eps = 1e-8
    config.optim.weight_decay = 0.0
    config.optim.warmup_steps = 20
    config.optim.schedule = "cosine"
    config.optim.ema_decays = (0.99,)
    config.optim.frozen = ("clip_mean", "clip_std")
    config.batch_size = 64
    config.total_steps = 500
    config.log_every = 50
    config.eval_every = 0
    config.checkpoint.every = 250

    if synthetic:
        config.init.prior = "random"
        config.data.embeddings = "synthetic"
        config.data.num_examples = dict(train=256, test=16, heldout=16)
    if preset == "tiny":
        config.model = config_lib.load_preset("prior", "tiny").model
        config.data.num_examples = dict(train=64, test=16, heldout=16)
        config.sample.respacing = "4"
        config.evals.retrieval.update(num_examples=16, batch_size=16)
        config_lib.tiny_loop(config, batch_size=16)
    elif preset == "bench":
        config.batch_size = 32
    elif preset == "paper":
        config.model.update(
            heads=32, head_dim=64, layers=20, embedding_dim=1280, text_token_dim=1280
        )
        config.model.num_text_tokens = 77
        config.model.dtype = "bfloat16"
        config.init.prior = "kandinsky-2-2-prior/prior"  # a converted diffusers directory
        config.data.embeddings = "operator_embeddings"
        config.data.clip_workdir = ""
        config.data.normalize = False  # pOps normalises Kandinsky's raw image embeddings
        config.optim.lr = 1e-5
        config.optim.schedule = "constant"
        config.optim.warmup_steps = 0
        config.optim.ema_decays = (0.9999,)
        config.batch_size = 256
        config.total_steps = 100_000
        config.mesh = dict(data=-1, fsdp=8, tensor=1)
        config.checkpoint.every = 5000
    elif preset == "demo":
        # No guidance on the shapes world: pOps' scale of 8 (union, recolour) pushes the
        # demo prior's output off the embeddings it was trained on. Chosen on the training
        # split (top-1 retrieval of the target among 200): union after 2,000 steps 5.5% at
        # scale 8, 95.5% at 1, 96.5% at 2, 93.5% at 4; recolour after 500 steps 57.5% at 8,
        # 63.5% at 4, 71% at 2, 71.5% at 1.
        config.operator.guidance = 1.0
    else:
        raise ValueError(
            f"configs/operator.py: unknown preset {preset!r} (tiny, demo, bench, paper)"
        )
    return config
