"""An unconditional ADM UNet: the backbone DiffusionCLIP edits (configs/edit.py) when it is
not the cascade's decoder.

Presets (`--config=configs/unet.py:<preset>`):
  tiny   a few steps of a very small UNet at 16 px, for tests;
  demo   the shapes world on one CPU at 32 px (the size the oracle and the demo CLIP
         read), DDPM's linear schedule and eps prediction, as DiffusionCLIP's backbones;
  paper  the original DDPM's 256 px UNet (google/ddpm-celebahq-256, -church-256,
         -bedroom-256: DiffusionCLIP's CelebA-HQ and LSUN backbones, 114M parameters):
         channels 128 x (1, 1, 2, 2, 4, 4), 2 ResBlocks a level, attention at 16 px, one
         head, additive time embedding, strided-conv resampling, linear betas 1e-4..0.02,
         fixed-small variance; DDPM's lr 2e-5, batch 64, EMA 0.9999, on a folder of images
         (`data.folder`). Public weights load with `clipgen.weights.load_unet`.
"""

from clipgen import config as config_lib


def get_config(arg: str | None = None):
    preset = arg or "demo"
    config = config_lib.base_config()
    config.stage = "unet"
    config.model.dtype = "float32"
    config.model.unet = dict(
        in_channels=3,
        out_channels=3,
        channels=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attention_resolutions=(4,),
        head_channels=32,
        norm_groups=8,
        dropout=0.0,
        remat=False,
        scan=False,  # runs of identical ResBlocks as one nn.scan each (UNetConfig.scan)
    )
    config.diffusion = dict(
        schedule="linear", timesteps=1000, prediction="eps", variance="fixed_small"
    )
    config.sample = dict(respacing="ddim50", method="ddim", eta=0.0)

    config.data.resolution = 32
    config.data.folder = ""  # a folder of images; empty: the shapes world's train split
    config.data.seed = 0

    config.optim.lr = 1e-3
    config.optim.warmup_steps = 100
    config.optim.ema_decays = (0.995,)
    config.batch_size = 32
    config.total_steps = 3000
    config.log_every = 50
    config.preview_every = 1000
    config.checkpoint.every = 500

    if preset == "tiny":
        config.model.unet.update(
            channels=8, channel_mult=(1, 2), attention_resolutions=(2,), head_channels=8
        )
        config.model.unet.norm_groups = 4
        config.data.resolution = 16
        config.sample.respacing = "ddim3"
        config_lib.tiny_loop(config, batch_size=8)
    elif preset == "paper":
        config.model.unet = dict(
            in_channels=3,
            out_channels=3,
            channels=128,
            channel_mult=(1, 1, 2, 2, 4, 4),
            num_res_blocks=2,
            attention_resolutions=(16,),
            mid_attention=True,
            head_channels=None,
            num_heads=1,
            dropout=0.0,
            resblock_updown=False,
            use_scale_shift_norm=False,
            norm_groups=32,
            norm_eps=1e-6,
            flip_sin_to_cos=False,
            freq_shift=1.0,
            downsample_padding=0,
            remat=True,
            scan=False,
        )
        config.data.resolution = 256
        config.data.folder = "celeba_hq_256"
        config.optim.lr = 2e-5
        config.optim.warmup_steps = 5000
        config.optim.schedule = "constant"
        config.optim.ema_decays = (0.9999,)
        config.batch_size = 64
        config.total_steps = 500_000
        config.mesh = dict(data=-1, fsdp=1, tensor=1)
        config.checkpoint.every = 5000
        config.preview_every = 10_000
    elif preset != "demo":
        raise ValueError(f"configs/unet.py: unknown preset {preset!r} (tiny, demo, paper)")
    return config
