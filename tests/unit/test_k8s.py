"""infra/k8s: the built-in resources validate against the Kubernetes schemas, offline
(kubernetes-validate bundles them); each KEDA ScaledObject scales a model's workers on exactly the Redis
lists the producer pushes that model's chunks to, from zero, with a cooldown longer than a chunk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

from sdfarm.queue import queue_lists
from sdfarm.settings import Settings

K8S = Path(__file__).resolve().parents[2] / "infra" / "k8s"


def manifests() -> list[dict[str, Any]]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for doc in manifests() if doc["kind"] == kind]


def test_built_in_resources_validate_against_the_kubernetes_schemas_offline() -> None:
    built_in = [doc for doc in manifests() if not doc["apiVersion"].startswith("keda.sh/")]
    assert {doc["kind"] for doc in built_in} >= {"Secret", "Deployment"}
    for doc in built_in:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_each_scaled_object_watches_every_list_of_its_models_queue() -> None:
    served = {d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0]["args"]
              for d in of_kind("Deployment")}
    secret_keys = {k for s in of_kind("Secret") for k in s["stringData"]}
    auths = {a["metadata"]["name"]: a for a in of_kind("TriggerAuthentication")}
    scaled = of_kind("ScaledObject")
    assert scaled
    for obj in scaled:
        model = obj["metadata"]["labels"]["sdfarm/model"]
        spec = obj["spec"]
        args = served[spec["scaleTargetRef"]["name"]]
        assert args[args.index("--model") + 1] == model  # it scales the workers of that model
        assert [t["metadata"]["listName"] for t in spec["triggers"]] == queue_lists(model)
        assert {t["type"] for t in spec["triggers"]} == {"redis"}
        assert spec["minReplicaCount"] == 0
        chunk_s = Settings().task_time_limit  # the longest a chunk may take
        assert spec["cooldownPeriod"] > chunk_s
        assert spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"][
            "stabilizationWindowSeconds"] > chunk_s  # no pod scaled away for a queue a chunk emptied
        names = [t["name"] for t in spec["triggers"]]  # every list counted: their lengths summed
        assert sorted(spec["advanced"]["scalingModifiers"]["formula"].replace(" ", "").split("+")) == sorted(names)
        for trigger in spec["triggers"]:
            auth = auths[trigger["authenticationRef"]["name"]]
            assert {ref["key"] for ref in auth["spec"]["secretTargetRef"]} <= secret_keys
