"""GGUF export for llama.cpp: a checkpoint as f16 / bf16 / q8_0 and Q4_K_M files.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/export.py \
        export.checkpoint=s3://bucket/run1/train/cerbero-7b/hf export.output_dir=s3://bucket/run1/gguf
    python jobs/export.py                      # the demo's checkpoint -> outputs/export/tiny-cpu/
"""

import sys

import hydra
from omegaconf import DictConfig

from cerbero_ray.config import register_configs
from cerbero_ray.runtime import hydra_job, launch

register_configs()


@hydra.main(config_path="../conf", config_name="export", version_base=None)
def main(cfg: DictConfig) -> None:
    res = launch("export", cfg)  # on this node alone: the stage table says export needs no cluster
    sys.exit(1 if res["failed"] else 0)  # a file that failed llama.cpp's check was named on the console


if __name__ == "__main__":
    hydra_job(main)
