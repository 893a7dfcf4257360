"""The data stage: Italian corpora -> packed 8192-token Parquet shards + manifest.json.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/data.py data=mix_sample paths.output_dir=/shared/outputs
    python jobs/data.py data=mix_sample            # embedded local cluster
"""

import hydra
from omegaconf import DictConfig

from cerbero_ray.config import register_configs
from cerbero_ray.runtime import hydra_job, launch

register_configs()


@hydra.main(config_path="../conf", config_name="data", version_base=None)
def main(cfg: DictConfig) -> None:
    launch("data", cfg)


if __name__ == "__main__":
    hydra_job(main)
