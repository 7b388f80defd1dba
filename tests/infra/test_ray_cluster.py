"""infra/ray/cluster-aws-gpu.yaml against Ray's own cluster-config schema, plus what the schema can't know."""

from __future__ import annotations

import copy

import jsonschema
import pytest
import yaml
from infra_helpers import INFRA, REPO

CONFIG = yaml.safe_load((INFRA / "ray" / "cluster-aws-gpu.yaml").read_text())


def test_config_validates_against_rays_schema():
    from ray.autoscaler._private.util import validate_config

    validate_config(copy.deepcopy(CONFIG))
    broken = copy.deepcopy(CONFIG)
    broken["available_node_types"]["gpu.a100x8"]["min_workers"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(broken)


def test_gpu_node_types_and_head_without_work():
    node_types = CONFIG["available_node_types"]
    assert CONFIG["head_node_type"] in node_types
    gpu_types = {node["node_config"]["InstanceType"] for node in node_types.values()}
    assert {"p4d.24xlarge", "g5.2xlarge"} <= gpu_types
    assert any("--num-cpus=0" in command for command in CONFIG["head_start_ray_commands"])
    assert sum(node.get("max_workers", 0) for node in node_types.values()) >= CONFIG["max_workers"]


def test_dashboard_and_ports_stay_private():
    assert any("--dashboard-host=127.0.0.1" in command for command in CONFIG["head_start_ray_commands"])
    permissions = CONFIG["provider"]["security_group"]["IpPermissions"]
    assert [(p["FromPort"], p["ToPort"]) for p in permissions] == [(22, 22)]
    for permission in permissions:
        assert all(r["CidrIp"] != "0.0.0.0/0" for r in permission["IpRanges"])


def test_credentials_come_from_instance_roles():
    for name, node in CONFIG["available_node_types"].items():
        config = node["node_config"]
        assert config["MetadataOptions"]["HttpTokens"] == "required", name
        if name != CONFIG["head_node_type"]:
            assert config["IamInstanceProfile"]["Arn"].endswith("instance-profile/ssd-ray-worker"), name
    options = " ".join(CONFIG["docker"]["run_options"])
    assert "AWS_ACCESS_KEY_ID" not in options and "AWS_SECRET_ACCESS_KEY" not in options


def test_image_is_the_gpu_project_image_at_the_project_version():
    repository, _, tag = CONFIG["docker"]["image"].rpartition(":")
    assert repository.endswith("/ssd-pipeline")
    assert tag == "0.1.0-gpu" and 'version = "0.1.0"' in (REPO / "pyproject.toml").read_text()
