"""Evaluation runs: `clipgen eval --config configs/eval.py:<preset> --workdir OUT`.

Presets:
  shapes   the demo cascade on the shapes world: oracle accuracies on the test and held-out
           captions, CLIP score and CLIP-space Frechet distance with the demo CLIP
           (workdir/demo/clip), and Inception FID only if --config.inception_weights is set
           (otherwise reported as skipped), against statistics of the test renders built on
           first use;
  coco30k  MS-COCO zero-shot FID: 30,000 val2014 captions (seeded), 256 px, TF1 bilinear to
           299 (the TTUR/ADM protocol); needs --config.coco_dir, --config.inception_weights
           and --config.reference_stats (`clipgen fid-stats --coco-dir ...`); CLIP score
           with the transformers CLIP at --config.clip_model, if given;
  tiny     real shapes images through the oracle, for tests.

The generator is `config.generator.type`: unclip (the cascade), real (the captions' real
images: FID ~0, a calibration) or noise (uniform noise: a floor).
"""

import ml_collections
from ml_collections import config_dict

from clipgen import stages
from clipgen.eval.coco import COCO30K_CAPTIONS, COCO_RESOLUTION


def _generator(resolution: int, workdir: str = "") -> ml_collections.ConfigDict:
    """The generator's fields. For `unclip` (clipgen.pipelines.unclip.load_pipeline):
    `workdir` holds the clip, prior, decoder, upsampler and upsampler2 runs; the final
    images are resized to `resolution` (0: as the cascade draws them); `preset` names the
    configs for runs whose checkpoints store none; `sampling` overrides the stage configs'
    sampling settings (None: keep them)."""
    respacings = {
        f"{spec.name}_respacing": config_dict.placeholder(str)
        for spec in stages.cascade()
        if spec.role != "clip"
    }
    blurs = {
        f"{spec.name}_condition_blur": config_dict.placeholder(float)
        for spec in stages.cascade()
        if spec.role == "upsampler"
    }
    return ml_collections.ConfigDict(
        {
            "type": "unclip",
            "resolution": resolution,
            "workdir": workdir,
            "preset": "demo",
            "sampling": {
                **respacings,
                **blurs,
                "prior_guidance": config_dict.placeholder(float),
                "prior_best_of": config_dict.placeholder(int),
                "decoder_guidance": config_dict.placeholder(float),
            },
        }
    )


def get_config(arg: str | None = None):
    preset = arg or "shapes"
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.inception_weights = ""  # pt_inception-2015-12-05 as .safetensors; none offline
    config.evals = ml_collections.ConfigDict()
    seed = config.get_ref("seed")

    if preset in ("shapes", "tiny"):
        config.demo_workdir = "workdir/demo"
        config.generator = _generator(64, config.get_ref("demo_workdir"))
        tiny = preset == "tiny"
        if tiny:
            config.generator.type = "real"
        config.evals.oracle = {
            "type": "shapes_oracle",
            "splits": ("test", "heldout"),
            "count": 8 if tiny else 200,
            "data_seed": 0,
            "seed": seed,
            "batch_size": 8 if tiny else 40,
        }
        if not tiny:
            config.evals.clip_score = {
                "type": "clip_score",
                "captions": {"source": "shapes", "split": "test", "count": 200, "seed": 0},
                "clip": {
                    "source": "clipgen",
                    "preset": "demo",
                    "workdir": config.get_ref("demo_workdir") + "/clip",
                },
                "scale": 100.0,
                "clamp": "mean",
                "caption_prefix": "",
                "clip_fd": True,
                "batch_size": 40,
                "seed": seed,
            }
        config.evals.fid = {
            "type": "fid",
            "captions": {"source": "shapes", "split": "test", "count": 16 if tiny else 500},
            "inception_weights": config.get_ref("inception_weights"),
            "reference_stats": config.get_ref("demo_workdir") + "/fid_shapes_test_64.npz",
            "build_reference": True,
            "reference_resolution": config.generator.get_ref("resolution"),
            "resize_mode": "tf1_bilinear",
            "optional": True,
            "batch_size": 8 if tiny else 40,
            "seed": seed,
        }
    elif preset == "coco30k":
        config.coco_dir = ""  # holds val2014/ and annotations/captions_val2014.json
        config.reference_stats = ""  # from `clipgen fid-stats --coco-dir ... --out FILE`
        config.num_captions = COCO30K_CAPTIONS
        config.resolution = COCO_RESOLUTION
        config.batch_size = 64
        config.clip_model = ""  # a transformers CLIP directory (e.g. ViT-B/32), optional
        config.clip_tokenizer = ""  # default: the clip_model directory's vocab.json/merges.txt
        config.generator = _generator(COCO_RESOLUTION)
        config.generator.preset = "paper"
        config.generator.resolution = config.get_ref("resolution")
        captions = {
            "source": "coco",
            "coco_dir": config.get_ref("coco_dir"),
            "count": config.get_ref("num_captions"),
            "seed": seed,
        }
        config.evals.fid = {
            "type": "fid",
            "captions": captions,
            "inception_weights": config.get_ref("inception_weights"),
            "reference_stats": config.get_ref("reference_stats"),
            "resize_mode": "tf1_bilinear",
            "reference_resolution": config.get_ref("resolution"),
            "kid": False,
            "batch_size": config.get_ref("batch_size"),
            "seed": seed,
        }
        config.evals.clip_score = {
            "type": "clip_score",
            "captions": dict(captions),
            "clip": {
                "source": "transformers",
                "path": config.get_ref("clip_model"),
                "tokenizer": config.get_ref("clip_tokenizer"),
            },
            "scale": 100.0,
            "clamp": "mean",
            "caption_prefix": "",
            "clip_fd": True,
            "optional": True,
            "batch_size": config.get_ref("batch_size"),
            "seed": seed,
        }
    else:
        raise ValueError(f"configs/eval.py: unknown preset {preset!r} (shapes, coco30k, tiny)")
    return config
