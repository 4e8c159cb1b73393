"""cluster.yaml validates against Ray's own autoscaler schema and keeps the node roles it promises."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def load_cluster_config() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_validates_against_ray_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load_cluster_config()
    validate_config(prepare_config(config))  # what `ray up` does: merge AWS defaults, then the JSON schema
    assert prepare_config(config)["available_node_types"].keys() == config["available_node_types"].keys()


def test_schema_check_rejects_a_broken_config():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load_cluster_config()
    config["available_node_types"]["gpu_worker"]["min_workerz"] = 0
    try:
        validate_config(prepare_config(config))
    except (jsonschema.ValidationError, ValueError):
        return
    raise AssertionError("an unknown node-type key passed Ray's schema")


def test_cluster_node_roles():
    config = load_cluster_config()
    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head node must run no tasks"
    gpu = [n for n in nodes.values() if n["node_config"]["InstanceType"].startswith(("g", "p"))]
    assert gpu and all(n["min_workers"] == 0 for n in gpu), "GPU workers autoscale from zero"
    assert any(n is not head and n not in gpu for n in nodes.values()), "a CPU worker type exists"
    assert all("IamInstanceProfile" in n["node_config"] for n in nodes.values())
    assert any("pip install" in c and "rxray" in c for c in config["setup_commands"])
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c), "token authentication stays on"
    assert any("auth_token" in target for target in config["file_mounts"])
