"""Evaluation: the seed's SQuAD-it and EVALITA tables (both protocols) for one or more checkpoints.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/evaluate.py \
        '+evaluate.checkpoints.base=s3://bucket/mistral-7b-v0.1' evaluate.gpus_per_worker=1
    python jobs/evaluate.py                    # embedded local cluster: the demo's checkpoint
"""

import hydra
from omegaconf import DictConfig

from cerbero_ray.config import register_configs
from cerbero_ray.runtime import hydra_job, launch

register_configs()


@hydra.main(config_path="../conf", config_name="evaluate", version_base=None)
def main(cfg: DictConfig) -> None:
    launch("evaluate", cfg)


if __name__ == "__main__":
    hydra_job(main)
