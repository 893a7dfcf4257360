"""The serving endpoint: the checkpoint behind an autoscaled Ray Serve app (Ctrl-C stops it).

python jobs/serve.py                       # embedded local cluster, the demo's checkpoint, 127.0.0.1:8000
serve run cerbero_ray.serve.app:build_app checkpoint=outputs/train/tiny-cpu/hf   # Ray's own CLI
"""

import os

import hydra
from omegaconf import DictConfig

from cerbero_ray.config import register_configs
from cerbero_ray.runtime import hydra_job, launch
from cerbero_ray.serve.proxy import proxy_env

register_configs()


@hydra.main(config_path="../conf", config_name="serve", version_base=None)
def main(cfg: DictConfig) -> None:
    os.environ.update(proxy_env(cfg.serve))  # read by Serve's HTTP proxy, which the embedded cluster starts
    launch("serve", cfg, blocking=True)


if __name__ == "__main__":
    hydra_job(main)
