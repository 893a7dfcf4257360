"""The main job: every stage in order on one Ray cluster: prepare_data, then train (tiny model, shipped sample).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/pipeline.py
    python jobs/pipeline.py                    # embedded local cluster, tiny model, shipped data
"""

import hydra
from omegaconf import DictConfig

from cerbero_ray.config import register_configs
from cerbero_ray.pipeline import run_pipeline
from cerbero_ray.runtime import init_ray

register_configs()


@hydra.main(config_path="../conf", config_name="pipeline", version_base=None)
def main(cfg: DictConfig) -> None:
    init_ray(cfg.cluster)
    run_pipeline(cfg)


if __name__ == "__main__":
    main()
