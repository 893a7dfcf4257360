"""Batch generation with a checkpoint: answers to prompts, or self-chat conversations from seeds.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/generate.py \
        generate.mode=self_chat generate.input=s3://bucket/seeds.txt \
        generate.checkpoint=s3://bucket/run1/train/cerbero-7b/hf generate.gpus_per_worker=1
    python jobs/generate.py                    # embedded local cluster: answers to the shipped questions
"""

import hydra
from omegaconf import DictConfig

from cerbero_ray.config import register_configs
from cerbero_ray.runtime import hydra_job, launch

register_configs()


@hydra.main(config_path="../conf", config_name="generate", version_base=None)
def main(cfg: DictConfig) -> None:
    launch("generate", cfg)


if __name__ == "__main__":
    hydra_job(main)
