"""Bulk labeling: Italian texts -> a label and every label's probability, scored by a checkpoint.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/label.py label/task=irony \
        label.input=s3://bucket/corpus/ label.checkpoint=s3://bucket/run1/train/cerbero-7b/hf label.gpus_per_worker=1
    python jobs/label.py                       # embedded local cluster: the shipped sample, sentiment
"""

import hydra
from omegaconf import DictConfig

from cerbero_ray.config import register_configs
from cerbero_ray.runtime import hydra_job, launch

register_configs()


@hydra.main(config_path="../conf", config_name="label", version_base=None)
def main(cfg: DictConfig) -> None:
    launch("label", cfg)


if __name__ == "__main__":
    hydra_job(main)
