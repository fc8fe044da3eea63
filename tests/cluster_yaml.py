"""The cluster tests' deployment as a YAML file: one prefill and one decode actor on half a core each and a 64 MiB
chunk store, written where the config loader reads it (so each test also goes through ClusterConfig.from_yaml)."""

from __future__ import annotations

from pathlib import Path

import yaml


def small_cluster_yaml(folder: Path, model_dir: str | Path, **options) -> Path:
    """`folder`/cluster.yaml with the small deployment; `options` add to or replace its settings."""
    config = {
        "model_dir": str(model_dir),
        "num_prefill_actors": 1,
        "num_decode_actors": 1,
        "cpus_per_actor": 0.5,
        "store_capacity_bytes": 64 << 20,
        **options,
    }
    path = Path(folder) / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
