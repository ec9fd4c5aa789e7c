"""Where the encode's model stages run on the cluster: how many encoder actors, and each stage's resources."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from cluster.ray_session import default_pool_size
from schemas.config import EncodeConfig


def encoder_pool_size(requested: int, started_ray: bool) -> int:
    """--num-encoders, or when 0 the default for the cluster Ray is connected to."""
    import ray

    return requested or default_pool_size(ray.cluster_resources(), os.cpu_count() if started_ray else None)


# restarts of a model actor that dies (killed for memory, its node lost) and retries of its calls: Ray Data's
# default is forever, so an actor that dies at every start would hold the job, and its memory, without end
MAX_ACTOR_RESTARTS = 3
# Ray 2.60's map_batches has no named parameter for these two yet, only the deprecated **ray_remote_args, whose
# warning would print on every run
warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")


def model_stage(
    config: EncodeConfig, size: int, batch_size: int, **constructor_kwargs: Any
) -> dict[str, Any]:
    """map_batches kwargs of a model actor stage (text encoder, VAE): `config`'s model and dtype, two torch threads
    per actor, a pool of `size` actors, each on a GPU where the cluster has them, restarted MAX_ACTOR_RESTARTS
    times at most."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    model = {"model": str(Path(config.model).resolve()), "dtype": config.dtype, "num_threads": 2}
    return {
        "batch_size": batch_size,
        "fn_constructor_kwargs": {**model, **constructor_kwargs},
        "compute": ray.data.ActorPoolStrategy(size=size),
        "max_restarts": MAX_ACTOR_RESTARTS,
        "max_task_retries": MAX_ACTOR_RESTARTS,
        **({"num_gpus": 1} if gpus else {"num_cpus": 1}),
    }
