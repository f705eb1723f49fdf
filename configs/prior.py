"""Diffusion prior: caption -> CLIP image embedding, trained on `clipgen embed` shards.

Presets (`--config=configs/prior.py:<preset>`):
  tiny   a few steps of a very small prior, for tests;
  demo   the shapes world on one CPU, over the demo CLIP's 64-d embeddings;
  bench  the benchmark shape (width 512, 6 layers, 8 heads of 64, 77 tokens, 512-d,
         batch 32, float32) on synthetic embeddings;
  paper  unCLIP's 1B prior: 24 layers x 2048, AdamW 1.1e-4, beta2 0.96, eps 1e-6,
         weight decay 6e-2, EMA 0.9999, cosine schedule, embeddings x 17.2 (Table 3).
"""

from clipgen import config as config_lib


def get_config(arg: str | None = None):
    preset = arg or "demo"
    config = config_lib.base_config()
    config.stage = "prior"

    config.model.heads = 4
    config.model.head_dim = 32
    config.model.layers = 4
    config.model.dropout = 0.0
    config.model.dtype = "float32"
    # The blocks as one nn.scan (compiles once for any depth) and recomputed in backward.
    config.model.scan = False
    config.model.remat = False
    config.model.embedding_dim = 64  # the CLIP's projection_dim
    config.model.text_token_dim = 128  # the CLIP text tower's width
    config.model.num_text_tokens = 24  # the CLIP's context length

    config.diffusion = dict(schedule="cosine", timesteps=1000, prediction="x0")
    config.sample = dict(
        respacing="64", method="ddpm", eta=0.0, guidance_scale=1.0, best_of=2, clip_denoised=None
    )

    # "synthetic" (random embeddings, for benchmarks) or a directory with train/, test/ and
    # heldout/ shards; missing ones are written with the CLIP run in clip_workdir.
    config.data.embeddings = "workdir/demo/embeddings"
    config.data.clip_workdir = "workdir/demo/clip"
    config.data.clip_preset = "demo"
    config.data.num_examples = dict(train=20000, test=500, heldout=500)
    config.data.normalize = True
    config.data.scaling = "mean_std"  # or "scale": z * config.data.scale
    config.data.scale = 17.2
    config.data.text_drop = 0.1
    config.data.seed = 0

    config.evals.retrieval = dict(
        type="prior_retrieval",
        splits=("test", "heldout"),
        num_examples=500,
        batch_size=250,
        seed=0,
        oracle_resolution=64,
    )

    config.optim.lr = 1e-3
    config.optim.b2 = 0.96
    config.optim.eps = 1e-6
    config.optim.weight_decay = 6e-2
    config.optim.warmup_steps = 100
    config.optim.ema_decays = (0.99,)
    config.optim.frozen = ("clip_mean", "clip_std")
    config.batch_size = 256
    config.total_steps = 2000
    config.log_every = 50
    config.eval_every = 1000
    config.checkpoint.every = 500

    if preset == "tiny":
        config.model.heads = 2
        config.model.head_dim = 8
        config.model.layers = 1
        config.model.embedding_dim = 16
        config.model.text_token_dim = 32
        config.data.embeddings = "synthetic"
        config.data.num_examples = dict(train=64, test=16, heldout=16)
        config.sample.respacing = "4"
        config.evals.retrieval.update(num_examples=16, batch_size=16)
        config_lib.tiny_loop(config, batch_size=16)
    elif preset == "bench":
        config.model.heads = 8
        config.model.head_dim = 64
        config.model.layers = 6
        config.model.embedding_dim = 512
        config.model.text_token_dim = 512
        config.model.num_text_tokens = 77
        config.data.embeddings = "synthetic"
        config.data.num_examples = dict(train=1024)
        config.batch_size = 32
        config.eval_every = 0
    elif preset == "paper":
        config.model.heads = 32
        config.model.head_dim = 64
        config.model.layers = 24
        config.model.embedding_dim = 1024  # ViT-H/16
        config.model.text_token_dim = 1024
        config.model.num_text_tokens = 77
        config.model.dtype = "bfloat16"
        config.data.embeddings = "embeddings"  # give the shard directory
        config.data.clip_workdir = ""
        config.data.scaling = "scale"
        config.sample.guidance_scale = 1.0  # guiding the prior hurt aesthetics (paper 5.5)
        config.optim.lr = 1.1e-4
        config.optim.warmup_steps = 10_000
        config.optim.ema_decays = (0.9999,)
        config.batch_size = 4096
        config.total_steps = 600_000
        config.mesh = dict(data=-1, fsdp=8, tensor=1)
        config.checkpoint.every = 5000
        config.eval_every = 10_000
    elif preset != "demo":
        raise ValueError(f"configs/prior.py: unknown preset {preset!r} (tiny, demo, bench, paper)")
    return config
