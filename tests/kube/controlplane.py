"""A real, local Kubernetes control plane for the integration tests: etcd + kube-apiserver +
kube-controller-manager, started from the binaries that ``make envtest`` (hack/envtest.sh) provides.

There is no scheduler and no kubelet: tests that need pods to run use :mod:`tests.kube.kubelet` (which also
serves pod logs to the API server).

    with ControlPlane(find_assets()) as cp:
        api = cp.api_client()          # kubernetes.client.ApiClient authenticated as a cluster admin
        print(cp.kubeconfig_path)      # the same credentials as a kubeconfig file

The API server listens on a random free port on 127.0.0.1 with its own CA and serving certificate (made with
the ``openssl`` command line tool), authenticates an admin through a static token file (user
``envtest-admin`` in group ``system:masters``) and authorizes with Node,RBAC, so tests see the same RBAC
decisions as a real cluster. Service-account tokens are signed with a generated key, so TokenRequest and the
serviceaccount controllers work.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ADMIN_USER = "envtest-admin"
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
CONTROL_PLANE_BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager")

# The controllers a Job-centric operator needs, by their kube-controller-manager names.
CONTROLLERS = (
    "job-controller",
    "garbage-collector-controller",
    "ttl-after-finished-controller",
    "serviceaccount-token-controller",
    "serviceaccount-controller",
    "namespace-controller",
    "root-ca-certificate-publisher-controller",  # kube-root-ca.crt, which service-account volumes project
    "persistentvolumeclaim-protection-controller",
    "persistentvolume-protection-controller",
    "pod-garbage-collector-controller",
    "cronjob-controller",
    "deployment-controller",
    "replicaset-controller",
)


def cache_root() -> Path:
    """Where hack/envtest.sh puts the binaries: one folder per Kubernetes version."""
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(data_home) / "modelmerge-envtest"


def _has_binaries(folder: Path) -> bool:
    return all(os.access(folder / name, os.X_OK) for name in CONTROL_PLANE_BINARIES)


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(p) if p.isdigit() else -1 for p in name.lstrip("v").split("."))


def find_assets() -> Path | None:
    """The folder with etcd, kube-apiserver and kube-controller-manager: ``$KUBEBUILDER_ASSETS`` when it holds
    them, else the newest version in the envtest cache, else None."""
    env = os.environ.get("KUBEBUILDER_ASSETS")
    if env and _has_binaries(Path(env)):
        return Path(env)
    root = cache_root()
    if not root.is_dir():
        return None
    versions = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and _has_binaries(p)]
    if not versions:
        return None
    return max(versions, key=lambda p: _version_key(p.name))


def find_helm() -> Path | None:
    """The helm binary hack/envtest.sh builds next to the control plane, else one on PATH, else None."""
    assets = find_assets()
    if assets is not None and os.access(assets / "helm", os.X_OK):
        return assets / "helm"
    found = shutil.which("helm")
    return Path(found) if found else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(folder: Path) -> None:
    """Writes ca.crt/ca.key, the API server's serving pair (server.crt/server.key) and the service-account
    signing key (sa.key, sa.pub) into ``folder``."""
    if shutil.which("openssl") is None:
        raise RuntimeError("the openssl command line tool is needed to make the control plane's certificates")
    folder.mkdir(parents=True, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(
        "req",
        "-x509",
        *ec,
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "3650",
        "-subj",
        "/CN=envtest-ca",
        cwd=folder,
    )
    _openssl(
        "req", "-new", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=kube-apiserver", cwd=folder
    )
    (folder / "server.ext").write_text(
        "basicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,"
        "DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n"
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "3650",
        "-extfile",
        "server.ext",
        cwd=folder,
    )
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=folder)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=folder)


class ControlPlaneError(RuntimeError):
    pass


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager as local processes.

    ``assets``: folder with the binaries (see :func:`find_assets`). ``workdir``: where certificates, etcd's
    data and the processes' logs go (a fresh temp dir by default, removed by :meth:`stop` unless ``keep`` or
    the environment variable ``ENVTEST_KEEP=1``). ``controllers``: kube-controller-manager's ``--controllers``.
    """

    def __init__(
        self,
        assets: Path | str,
        workdir: Path | str | None = None,
        controllers: tuple[str, ...] = CONTROLLERS,
        keep: bool | None = None,
    ) -> None:
        self.assets = Path(assets)
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="envtest-"))
        self.controllers = controllers
        self.keep = keep if keep is not None else os.environ.get("ENVTEST_KEEP") == "1"
        self.token = os.urandom(16).hex()
        self.port = 0
        self._procs: list[tuple[str, subprocess.Popen]] = []

    # -- public surface -------------------------------------------------------------------------------------
    @property
    def host(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> Path:
        return self.workdir / "pki" / "ca.crt"

    @property
    def kubeconfig_path(self) -> Path:
        return self.workdir / "admin.kubeconfig"

    def log_path(self, component: str) -> Path:
        return self.workdir / "logs" / f"{component}.log"

    def write_kubeconfig(self, path: Path, *, token: str | None = None, user: str = ADMIN_USER) -> Path:
        """Writes a kubeconfig for this API server to ``path``: the admin's, or ``user`` with bearer ``token``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters:\n- name: envtest\n  cluster:\n    server: {self.host}\n"
            f"    certificate-authority: {self.ca_file}\n"
            f"users:\n- name: {user}\n  user:\n    token: {token or self.token}\n"
            f"contexts:\n- name: envtest\n  context:\n    cluster: envtest\n    user: {user}\n"
            "current-context: envtest\n"
        )
        return path

    def api_client(self, token: str | None = None):
        """A ``kubernetes.client.ApiClient`` of its own (its own configuration and connection pool): the admin's, or
        one authenticated by ``token``."""
        from modelmerge.kubeclient import api_client

        kubeconfig = self.kubeconfig_path
        if token is not None:
            name = hashlib.sha256(token.encode()).hexdigest()[:16]
            kubeconfig = self.write_kubeconfig(
                self.workdir / "kubeconfigs" / f"{name}.kubeconfig", token=token, user="token"
            )
        return api_client(kubeconfig=str(kubeconfig))

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- lifecycle ------------------------------------------------------------------------------------------
    def start(self, timeout: float = 120.0) -> None:
        missing = [b for b in CONTROL_PLANE_BINARIES if not os.access(self.assets / b, os.X_OK)]
        if missing:
            raise ControlPlaneError(f"{self.assets} lacks {', '.join(missing)}: run `make envtest`")
        atexit.register(self.stop)
        for attempt in range(3):
            try:
                self._start(timeout)
                return
            except ControlPlaneError as e:
                # A port picked by free_port() can be taken before the process binds it: try again then.
                if attempt == 2 or "address already in use" not in str(e):
                    self.stop()
                    raise
                self._kill_all()
                shutil.rmtree(self.workdir / "etcd", ignore_errors=True)
            except BaseException:
                self.stop()
                raise

    def _start(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        w = self.workdir
        (w / "logs").mkdir(parents=True, exist_ok=True)
        pki = w / "pki"
        make_pki(pki)
        (w / "tokens.csv").write_text(f'{self.token},{ADMIN_USER},{ADMIN_USER},"system:masters"\n')

        etcd_port, peer_port = free_port(), free_port()
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        self._spawn(
            "etcd",
            [
                "--name=envtest",
                f"--data-dir={w / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=envtest={peer_url}",
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ],
        )
        self._wait(f"{etcd_url}/health", deadline, "etcd")

        self.port = free_port()
        self._spawn(
            "kube-apiserver",
            [
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                "--endpoint-reconciler-type=none",  # a loopback advertise address is refused otherwise
                f"--secure-port={self.port}",
                f"--cert-dir={pki}",
                f"--tls-cert-file={pki / 'server.crt'}",
                f"--tls-private-key-file={pki / 'server.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--token-auth-file={w / 'tokens.csv'}",
                "--authorization-mode=Node,RBAC",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                f"--api-audiences={SERVICE_ACCOUNT_ISSUER}",
                "--allow-privileged=true",
                # Pod logs: reach the kubelet harness at its Node's InternalIP (127.0.0.1). No client certificate
                # (the harness does not ask for one) and no --kubelet-certificate-authority, so the harness's
                # self-signed serving certificate is accepted.
                "--kubelet-preferred-address-types=InternalIP",
                "--profiling=false",
                "--v=1",
            ],
        )
        self._wait(f"{self.host}/readyz", deadline, "kube-apiserver")
        self.write_kubeconfig(self.kubeconfig_path)

        self._spawn(
            "kube-controller-manager",
            [
                f"--kubeconfig={self.kubeconfig_path}",
                f"--authentication-kubeconfig={self.kubeconfig_path}",
                f"--authorization-kubeconfig={self.kubeconfig_path}",
                f"--controllers={','.join(self.controllers)}",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                "--use-service-account-credentials=false",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                f"--cert-dir={w / 'kcm-certs'}",
                "--v=1",
            ],
        )
        # The controller manager is up once the serviceaccount controller has made the default namespace's
        # "default" ServiceAccount (pods cannot be admitted in a namespace before its ServiceAccount exists).
        self._wait(
            f"{self.host}/api/v1/namespaces/default/serviceaccounts/default", deadline, "kube-controller-manager"
        )

    def stop(self) -> None:
        """Stops the processes (newest first, each whole process group) and removes the work dir."""
        atexit.unregister(self.stop)
        self._kill_all()
        if self._own_workdir and not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- helpers --------------------------------------------------------------------------------------------
    def _kill_all(self) -> None:
        while self._procs:
            _, proc = self._procs.pop()
            _terminate(proc)

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.log_path(name), "ab")  # noqa: SIM115 - the child keeps it open
        try:
            proc = subprocess.Popen(
                [str(self.assets / name), *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
            )
        finally:
            log.close()
        self._procs.append((name, proc))

    def _wait(self, url: str, deadline: float, component: str) -> None:
        ctx = ssl.create_default_context(cafile=str(self.ca_file)) if url.startswith("https") else None
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {self.token}"})
        last = ""
        while True:
            for name, proc in self._procs:
                if proc.poll() is not None:
                    raise ControlPlaneError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")
            try:
                with urllib.request.urlopen(req, timeout=5, context=ctx) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError) as e:
                last = str(e)
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"{component} not ready at {url} in time ({last}):\n{self.log_tail(component)}")
            time.sleep(0.2)

    def log_tail(self, component: str, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path(component).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _terminate(proc: subprocess.Popen, grace: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
