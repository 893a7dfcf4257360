"""The main job: every stage in order on one Ray cluster: data, train, label, evaluate, export
(tiny model, shipped sample).

ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/recipe.py
python jobs/recipe.py                    # embedded local cluster, tiny model, shipped data
"""

import sys

import hydra
from omegaconf import DictConfig

from cerbero_ray.config import register_configs
from cerbero_ray.runtime import hydra_job, launch

register_configs()


@hydra.main(config_path="../conf", config_name="recipe", version_base=None)
def main(cfg: DictConfig) -> None:
    res = launch("recipe", cfg)
    sys.exit(1 if res.get("export", {}).get("failed") else 0)  # a GGUF file that failed llama.cpp's check


if __name__ == "__main__":
    hydra_job(main)
