"""CLIP: contrastive pretraining of the image and text towers.

Presets (`--config=configs/clip.py:<preset>`):
  tiny   a few steps of a very small model, for tests;
  demo   the shapes world on one CPU: 32 px ViT, a convolutional stem to 8 px patches,
         shapes BPE;
  paper  ViT-H/16 at 256 px, text width 1024 x 24 (unCLIP paper, appendix C);
         trained on a real image-caption set, with OpenAI's BPE (give its path).
"""

from clipgen import config as config_lib


def get_config(arg: str | None = None):
    preset = arg or "demo"
    config = config_lib.base_config()
    config.stage = "clip"
    config.model.dtype = "float32"
    # Each tower's blocks as one nn.scan (compiles once for any depth); remat in backward.
    config.model.scan = False
    config.model.remat = False
    config.model.projection_dim = 64
    config.model.vision = dict(
        image_size=32,
        patch_size=8,
        width=128,
        layers=4,
        heads=4,
        mlp_dim=512,
        act="gelu",
        position_init=1.0,
    )
    config.model.text = dict(width=128, layers=4, heads=4, mlp_dim=512, act="gelu")
    # procedural (the shapes world), tfds:DATA_DIR[:NAME], folder:DIR or wds:DIR (tar
    # shards): clipgen.data.sources
    config.data.source = "procedural"
    # Attributes (colour, shape, size) in which every odd example differs from the one
    # before it, as hard negatives; procedural source only (clipgen.data.siblings). With the
    # demo's stem (below), linear probes of the image embedding after 840 steps
    # (benchmarks/clip_probe.py, test / held-out single-object scenes) read shape at 75.0% /
    # 21.6% without hard negatives, 99.4% / 80.6% with ("shape",) but colour then at 89.0% /
    # 58.4%, and 90.8% / 44.6% with ("shape", "colour"), colour 98.6% / 89.6%. The last drew
    # best through the cascade: the default demo's oracle, single-object test captions
    # whole 89.3% -> 92.9%, colour 92.9% -> 100%, held-out 67.6% -> 76.5%, all test captions
    # 40.6% -> 48.4% against ("shape",).
    config.data.hard_negatives = ("shape", "colour") if preset == "demo" else ()
    config.data.tokenizer = "shapes"
    config.data.num_merges = 200
    config.data.context_length = 24
    config.data.resolution = 32
    config.data.seed = 0
    config.evals.retrieval = dict(
        type="clip_retrieval", splits=("test", "heldout"), num_examples=500, batch_size=250
    )
    config.optim.lr = 1e-3
    config.optim.b2 = 0.98
    config.optim.eps = 1e-6
    config.optim.weight_decay = 0.1
    config.optim.warmup_steps = 100
    config.optim.ema_decays = (0.99,)
    config.batch_size = 128
    # Measured on a 2-core CPU. With 4 px patches and position embeddings drawn at CLIP's
    # std 0.02, 3,000 steps (37 to 43 minutes) reached 99.8% top-1 caption->image retrieval
    # among 500 test scenes (98.2% on held-out colour-shape pairs), 680 steps 70%, positions
    # learned last. 8 px patches alone: 70% (held-out 50%) at 600 steps; with position
    # embeddings drawn at std 1.0 as well: 87.6% (held-out 88.0%) at 600 steps, at 168 steps
    # a minute against 89 with 4 px patches (4 px with std 1.0: 89.6% / 84.8%).
    config.total_steps = 3000
    config.log_every = 50
    config.eval_every = 500
    config.checkpoint.every = 500

    if preset == "tiny":
        config.model.projection_dim = 16
        config.model.vision = dict(
            image_size=32, patch_size=8, width=32, layers=1, heads=2, mlp_dim=64, act="gelu"
        )
        config.model.text = dict(width=32, layers=1, heads=2, mlp_dim=64, act="gelu")
        config.data.num_merges = 200
        config.evals.retrieval.update(num_examples=16, batch_size=16)
        config_lib.tiny_loop(config, batch_size=16, eval_every=4)
    elif preset == "paper":
        config.model.projection_dim = 1024
        config.model.vision = dict(
            image_size=256,
            patch_size=16,
            width=1280,
            layers=32,
            heads=16,
            mlp_dim=5120,
            act="gelu",
        )
        config.model.text = dict(width=1024, layers=24, heads=16, mlp_dim=4096, act="gelu")
        config.model.dtype = "bfloat16"
        config.data.tokenizer = "bpe_simple_vocab_16e6.txt.gz"
        config.data.context_length = 77
        config.data.resolution = 256
        config.batch_size = 32768
        config.total_steps = 400_000
        config.optim.lr = 5e-4
        config.optim.warmup_steps = 2000
        config.optim.weight_decay = 0.2
        config.optim.ema_decays = (0.9999,)
        config.mesh = dict(data=-1, fsdp=8, tensor=1)
        config.checkpoint.every = 2000
        config.eval_every = 5000
    elif preset == "demo":
        # Measured after the fixed plan's 840 steps with benchmarks/clip_probe.py (linear
        # probes of the image embedding on single-object test / held-out scenes; caption ->
        # image retrieval among 500). A constant learning rate after the warm-up instead of
        # the cosine decay to zero: shape 64.2% -> 73.8% (held-out 28.6% -> 34.8%), retrieval
        # 93.2% -> 94.8% (held-out 84.6% -> 89.0%). Then a convolutional stem in place of the
        # 8 px patchify (12% slower a step): shape 99.4% (held-out 80.6%), retrieval 99.4%
        # (held-out 94.6%).
        config.optim.schedule = "constant"
        config.model.vision.stem_channels = (32, 64, 128)
    else:
        raise ValueError(f"configs/clip.py: unknown preset {preset!r} (tiny, demo, paper)")
    return config
