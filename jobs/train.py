"""The training stage: packed shards -> full fine-tune, Ray Train + DeepSpeed ZeRO-1.

ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/train.py train=zero1_8xh100 ...
python jobs/train.py                       # embedded local cluster: tiny model, 2 CPU workers
"""

import hydra
from omegaconf import DictConfig

from cerbero_ray.config import register_configs
from cerbero_ray.runtime import hydra_job, launch

register_configs()


@hydra.main(config_path="../conf", config_name="train", version_base=None)
def main(cfg: DictConfig) -> None:
    launch("train", cfg)


if __name__ == "__main__":
    hydra_job(main)
