"""Autoregressive prior (unCLIP section 2.2): PCA codes of the CLIP image embedding,
quantised into buckets, predicted one by one by a causal transformer.

Presets are those of configs/prior.py (same data, evaluation and loop settings) with the
AR network and its optimiser: tiny, demo, bench, paper (319 PCA dimensions of 1024,
1024 buckets, AdamW lr 1.6e-4, weight decay 4e-2, EMA 0.999: Table 3 and section 2.2).
"""

from clipgen import config as config_lib
from clipgen.models import ar_prior


def get_config(arg: str | None = None):
    preset = arg or "demo"
    config = config_lib.load_preset("prior", preset)
    config.stage = "ar_prior"
    dims = {
        key: config.model[key]
        for key in ("embedding_dim", "text_token_dim", "num_text_tokens", "scan", "remat")
    }
    config.model = dict(
        width=128,
        heads=4,
        layers=4,
        num_codes=32,
        num_buckets=64,
        num_dot_buckets=16,
        dtype=config.model.dtype,
        **dims,
    )
    del config["diffusion"]
    config.sample = dict(top_p=0.9, dot_range=(0.5, 1.0))
    config.optim.frozen = ar_prior.STATISTICS
    config.optim.weight_decay = 4e-2

    if preset == "tiny":
        config.model.update(width=16, heads=2, layers=1, num_codes=8, num_buckets=16)
        config.model.num_dot_buckets = 4
    elif preset == "bench":
        config.model.update(width=512, heads=8, layers=6, num_codes=128, num_buckets=256)
    elif preset == "paper":
        config.model.update(width=2048, heads=32, layers=24, num_codes=319, num_buckets=1024)
        config.model.num_dot_buckets = 1024
        config.optim.lr = 1.6e-4
        config.optim.b2 = 0.91
        config.optim.eps = 1e-10
        config.optim.ema_decays = (0.999,)
        config.total_steps = 1_000_000
    return config
