"""Published numbers drawn as labelled reference marks beside our measurements (never mixed
with them). Sources: ../shared/REFERENCE.md and the seed papers, as cited per entry."""

PUBLISHED = {
    "reslim_speedup": {
        "value": 660.0, "unit": "x",
        "label": "ORBIT-2 published: up to 660x faster training than upsample-first ViT "
                 "(GPUs, high resolution; arXiv 2505.04802)",
    },
    "tiles_speedup": {
        "value": 515.0, "unit": "x",
        "label": "ORBIT-2 published: TILES 2x (16 tiles, 8 GPUs) to 515x (2,048 GPUs)",
        "low": 2.0,
    },
    "dchag_saving": {
        "value": 0.75, "unit": "fraction",
        "label": "D-CHAG published: up to 75% less memory (1,024 GPUs; arXiv 2506.21411)",
    },
    "batch_scaling": {
        "value": 0.94, "unit": "fraction",
        "label": "seed 000 published: 94% batch scaling on 2,048 GPUs",
    },
    "strong_scaling": {
        "value": 0.74, "high": 0.98, "unit": "fraction",
        "label": "ORBIT-2 published: 74-98% strong scaling (up to 65,536 GPUs)",
    },
    "sequence_tokens": {
        "value": 188_000, "unit": "tokens",
        "label": "seed 000 published: 188K tokens with full attention",
    },
    "inference_ms": {
        "value": 4.0, "unit": "ms/sample",
        "label": "ORBIT-2 published: 4 ms/sample, 9.5M model, 8 GPUs",
    },
}
