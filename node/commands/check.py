"""``lumbar-node check``: can this configuration run here, and can it reach its destinations?

The pre-flight an administrator runs after editing the configuration, before enabling the
service, or while it runs (like ``nginx -t`` or ``apachectl configtest``). It takes the same
flags as ``serve`` and checks, each independently, one line each:

* the configuration (the same validation as ``serve``: an invalid file exits 2 at once);
* who may send (``[callers]``): only this machine when no remote caller is listed;
* the state directory: writable (a temp file written, fsynced and removed), free space
  against ``node.free_disk_floor_mb``, whether a node is running on it (its lock);
* the index: its layout is one this version reads;
* the listening ports (DICOM, TLS, status endpoint): free to bind, or, when a node is
  running on this state directory, answering (C-ECHO, ``/healthz``);
* the TLS certificate and key load;
* the models: the shipped (or ``ai.weights_dir``) weights load and match their cards;
* every destination: a test association proposing what a delivery proposes plus
  Verification, a C-ECHO, and whether the peer accepts the SOP class of every result kind
  it is configured for (a SEG the archive refuses is otherwise found only when the first
  delivery is dead-lettered); STOW-RS destinations get one QIDO-RS request;
* with ``--files``, every stored instance: its file is there with the size and SHA-256
  acknowledged at receipt (a scrub: disk faults are otherwise found only when the series is
  analysed again).

Nothing is stored, sent or changed. Exit status 0 when nothing failed (warnings allowed), 1
when a check failed, 2 for an invalid configuration.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import socket
import ssl
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from node.commands.serve import EXIT_CONFIG, overrides_from_args
from node.commands.serve import add_arguments as add_serve_arguments
from node.config import Destination, NodeConfig

#: exit status when at least one check failed
EXIT_FAILED = 1
OK, WARN, FAIL, SKIP = "ok", "warn", "FAIL", "skip"
#: seconds to wait for the running node's own C-ECHO and /healthz
LOCAL_TIMEOUT_S = 5.0
#: how many damaged files ``--files`` names, and how many index rows it reads at a time
FAULTS_SHOWN = 5
FILES_PAGE = 500
#: destinations probed at once
MAX_PROBES = 8


@dataclass(frozen=True)
class Finding:
    """One checked item: ``level`` is ok / warn / FAIL / skip, ``detail`` what was found."""

    item: str
    level: str
    detail: str


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``serve``'s flags (so the check sees what ``serve`` would run) and the check's own."""
    add_serve_arguments(parser)
    parser.add_argument(
        "--no-network", action="store_true", help="do not contact the destinations"
    )
    parser.add_argument("--no-models", action="store_true", help="do not load the models")
    parser.add_argument(
        "--files", action="store_true",
        help="also read every stored instance and compare it with what was acknowledged (reads the whole spool)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    """Run every check, print them, and return the exit status."""
    from node.commands.status import load_cli_config

    config = load_cli_config(args, overrides_from_args(args))
    if config is None:
        return EXIT_CONFIG
    findings = list(check_all(config, network=not args.no_network, models=not args.no_models))
    if args.files:
        findings.append(check_files(config))
    failed = any(f.level == FAIL for f in findings)
    if args.json:
        print(json.dumps({"ok": not failed, "checks": [asdict(f) for f in findings]}, indent=2))
    else:
        width = max(len(f.item) for f in findings)
        for f in findings:
            print(f"{f.level:4s}  {f.item:{width}s}  {f.detail}")
        print("check: " + ("FAILED" if failed else "passed"))
    return EXIT_FAILED if failed else 0


def check_all(config: NodeConfig, *, network: bool = True, models: bool = True) -> Iterator[Finding]:
    """Every check in order; each catches its own failures, so one never hides the next."""
    node = config.node
    yield Finding(
        "configuration",
        OK,
        f"{config.source or '(built-in defaults)'}: AE {node.ae_title}, port {node.port}, "
        f"state {config.state_dir}, {len(config.destinations)} destination(s)",
    )
    yield check_callers(config)
    yield check_state_dir(config)
    yield check_free_space(config)
    from node.state_lock import running_node

    owner = running_node(config.state_dir)
    running = owner is not None
    if running:
        detail = f"a node runs on this state directory (pid {owner or 'unknown'}): its ports are asked"
    else:
        detail = "none on this state directory"
    yield Finding("running node", OK, detail)
    yield check_index(config)
    yield check_orphans(config)
    yield from check_ports(config, running)
    if config.tls.enabled:
        yield check_tls(config)
    if models:
        yield from check_models(config)
    else:
        yield Finding("models", SKIP, "--no-models")
    # concurrently: an unreachable host costs its connect timeout once, not once per destination
    with ThreadPoolExecutor(max_workers=max(1, min(len(config.destinations), MAX_PROBES))) as pool:
        yield from pool.map(lambda d: check_destination(config, d, network), config.destinations)
    if not config.destinations:
        yield Finding("destinations", WARN, "none configured: results stay in the state directory")


def check_callers(config: NodeConfig) -> Finding:
    """Who may send: the most common reason a scanner "cannot send" is a caller not listed."""
    callers = config.callers
    listed = [f"{c.ae_title}{'@' + c.address if c.address else ''}" for c in callers.allowed]
    local = "callers on this machine" if callers.allow_any_loopback else ""
    if listed:
        who = ", ".join(([local] if local else []) + listed)
        return Finding("senders", OK, f"may send: {who}")
    if local:
        return Finding(
            "senders", WARN,
            f"only {local} may send: list scanners and PACS under [[callers.allowed]]",
        )
    return Finding("senders", FAIL, "nobody may send: allow_any_loopback is off and [[callers.allowed]] is empty")


def check_state_dir(config: NodeConfig) -> Finding:
    """The state directory (or the folder it will be made in) takes a durable file.

    The configuration already refused a path that is not a directory or not writable by
    permission; this catches what permissions do not say (a read-only or broken mount).
    """
    state = config.state_dir
    target = state
    while not target.exists():
        target = target.parent
    try:
        fd, name = tempfile.mkstemp(prefix=".lumbar-check-", dir=target)
        try:
            os.write(fd, b"check")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(name)
    except OSError as exc:
        return Finding("state directory", FAIL, f"cannot write in {target}: {exc.strerror or exc}")
    where = f"{state} (writable)" if target == state else f"{state} will be created in {target} (writable)"
    return Finding("state directory", OK, where)


def check_free_space(config: NodeConfig) -> Finding:
    """Free space against the floor below which the receiver refuses instances."""
    from node.spool import Spool

    free = Spool(config.state_dir).free_mb()
    floor = config.node.free_disk_floor_mb
    text = f"{free:.0f} MB free, node.free_disk_floor_mb = {floor} MB"
    if free < floor:
        return Finding("free space", FAIL, f"{text}: every C-STORE would be refused")
    if free < 2 * floor:
        return Finding("free space", WARN, f"{text}: less than twice the floor")
    return Finding("free space", OK, text)


def check_index(config: NodeConfig) -> Finding:
    """The index exists in a layout this version reads (opened read-only)."""
    from node.commands.status import ReadOnlyIndex
    from node.db import INDEX_VERSION, check_index_version
    from node.errors import NodeError

    path = config.index_path
    if not path.exists():
        return Finding("index", OK, f"{path} does not exist yet (created at the first start)")
    try:
        index = ReadOnlyIndex(path)
        try:
            check_index_version(index, stamp=False)  # type: ignore[arg-type]
        finally:
            index.close()
    except NodeError as exc:
        return Finding("index", FAIL, str(exc))
    except Exception as exc:  # noqa: BLE001 - sqlite3.Error and friends: report, go on
        return Finding("index", FAIL, f"cannot read {path}: {exc}")
    return Finding("index", OK, f"{path} (layout {INDEX_VERSION})")


def check_orphans(config: NodeConfig) -> Finding:
    """Spool files a crash left without an index row, set aside at start-up (:mod:`node.orphans`)."""
    from node.commands.status import human_size
    from node.orphans import count_orphans, orphans_dir

    found = count_orphans(config.state_dir)
    if not found.files:
        return Finding("set-aside files", OK, "none")
    keep = config.retention.keep_days
    until = (f"retention removes them {keep:g} days after they were written, or once sent again"
             if keep > 0 else "retention is off")
    return Finding(
        "set-aside files", WARN,
        f"{found.files} file(s), {human_size(found.bytes)} in {orphans_dir(config.state_dir)} (received but never"
        f" acknowledged, or left by an interrupted retention run): send them again with 'lumbar-node push"
        f" {orphans_dir(config.state_dir)} --to AE@host:port' if wanted; {until}",
    )


def check_files(config: NodeConfig) -> Finding:
    """Every indexed instance's file against the size and SHA-256 acknowledged at receipt.

    Read-only, beside a running node: a file that retention removes meanwhile (its row is
    gone when looked at again) is not a fault.
    """
    from node.commands.status import ReadOnlyIndex, human_size
    from node.spool import Spool

    if not config.index_path.exists():
        return Finding("stored files", OK, "no index yet: nothing stored")
    spool = Spool(config.state_dir)
    index = ReadOnlyIndex(config.index_path)
    checked = size = 0
    faults: list[str] = []
    try:
        if not index.has_table("instances"):
            return Finding("stored files", OK, "nothing stored")
        after = ""
        while page := index.execute(  # pages: no read transaction held over the whole scan
            "SELECT sop_instance_uid, series_instance_uid, path, sha256, size_bytes FROM instances"
            " WHERE sop_instance_uid > ? ORDER BY sop_instance_uid LIMIT ?", (after, FILES_PAGE),
        ).fetchall():
            for sop_uid, series_uid, path, digest, n_bytes in page:
                _, problem = spool.read_checked(path, digest, n_bytes)
                if problem is not None and index.execute(
                    "SELECT 1 FROM instances WHERE sop_instance_uid = ?", (sop_uid,)
                ).fetchone() is not None:
                    faults.append(f"{problem} (series {series_uid})")
                checked += 1
                size += n_bytes
            after = page[-1][0]
    finally:
        index.close()
    where = f"{checked} instance file(s), {human_size(size)}"
    if not faults:
        return Finding("stored files", OK, f"{where}: each as acknowledged")
    shown = "; ".join(faults[:FAULTS_SHOWN]) + ("; ..." if len(faults) > FAULTS_SHOWN else "")
    return Finding(
        "stored files", FAIL,
        f"{len(faults)} of {where} missing or changed since receipt (their series fail when analysed;"
        f" have them sent again): {shown}",
    )


def check_ports(config: NodeConfig, running: bool) -> Iterator[Finding]:
    """Each port the node would open: free, or answered by the node already running."""
    node = config.node
    ports = [("DICOM port", node.host, node.port)]
    if config.tls.enabled:
        ports.append(("TLS port", node.host, config.tls.port))
    if config.http.enabled:
        ports.append(("status endpoint", config.http.host, config.http.port))
    for item, host, port in ports:
        if not running:
            yield _bindable(item, host, port)
        elif item == "DICOM port":
            yield _echo_self(config)
        elif item == "status endpoint":
            yield _healthz(config)
        else:
            yield Finding(item, SKIP, f"{host}:{port}: used by the running node")


def _bindable(item: str, host: str, port: int) -> Finding:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the listeners do
        try:
            sock.bind((host, port))
        except OSError as exc:
            why = {
                errno.EADDRINUSE: "in use by another program",
                errno.EACCES: "needs privileges (ports below 1024: run as root or grant "
                "CAP_NET_BIND_SERVICE, see systemd/)",
                errno.EADDRNOTAVAIL: "no such address on this host",
            }.get(exc.errno or 0, exc.strerror or str(exc))
            return Finding(item, FAIL, f"{host}:{port}: {why}")
    return Finding(item, OK, f"{host}:{port} free")


def _local_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host  # noqa: S104 - a wildcard listener


def _echo_self(config: NodeConfig) -> Finding:
    from node.commands.echo import NoAssociation, Peer, c_echo

    node = config.node
    peer = Peer(node.ae_title, _local_host(node.host), node.port)
    try:
        code = c_echo(peer, "LUMBARCHECK", LOCAL_TIMEOUT_S)
    except NoAssociation:
        return Finding(
            "DICOM port",
            FAIL,
            f"{peer}: the running node did not accept an association from this host "
            "(check [callers] if it is not loopback)",
        )
    if code != 0:
        return Finding("DICOM port", FAIL, f"{peer}: C-ECHO status {code}")
    return Finding("DICOM port", OK, f"{peer} answers C-ECHO")


def _healthz(config: NodeConfig) -> Finding:
    url = f"http://{_local_host(config.http.host)}:{config.http.port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=LOCAL_TIMEOUT_S) as response:  # noqa: S310 - the node's own endpoint
            body = json.loads(response.read() or b"{}")
            return Finding("status endpoint", OK, f"{url}: healthy ({', '.join(body.get('checks', {}))})")
    except urllib.error.HTTPError as exc:
        failing = [name for name, c in json.loads(exc.read() or b"{}").get("checks", {}).items() if not c.get("ok")]
        return Finding("status endpoint", FAIL, f"{url}: HTTP {exc.code}, failing: {', '.join(failing) or '?'}")
    except (OSError, ValueError) as exc:
        return Finding("status endpoint", FAIL, f"{url}: {exc}")


def check_tls(config: NodeConfig) -> Finding:
    """The TLS listener's certificate, key (and CA) load into a server context."""
    from node.receiver import server_tls_context

    try:
        server_tls_context(config.tls)
    except (OSError, ssl.SSLError) as exc:
        return Finding("TLS certificate", FAIL, f"{config.tls.cert_file}: {exc}")
    return Finding("TLS certificate", OK, f"{config.tls.cert_file} and its key load")


def check_models(config: NodeConfig) -> Iterator[Finding]:
    """Load the analyser as the worker would; a stage that does not load is a warning
    (the analysis runs without it and flags that), the segmentation model a failure."""
    try:
        from ai.pipeline import Analyzer

        analyzer = Analyzer(
            device=config.ai.device,
            batch_size=config.ai.batch_size,
            weights_dir=config.ai.weights_dir,
            threads=1,
            precision=config.ai.precision,
        )
    except Exception as exc:  # noqa: BLE001 - whatever stops the model loading is the finding
        yield Finding("models", FAIL, f"{type(exc).__name__}: {exc}")
        return
    loaded = ", ".join(f"{m['name']} {m['version']}" for m in analyzer.models())
    yield Finding("models", OK, f"on {analyzer.device}: {loaded}")
    for flag in analyzer.setup_flags:
        yield Finding("models", WARN, flag)


def check_destination(config: NodeConfig, destination: Destination, network: bool) -> Finding:
    """Probe one destination and compare what it accepts with the kinds it should receive."""
    from node.outbox import PRODUCED_SOP_CLASS, Kind, is_shadow, wants
    from node.senders import make_sender

    item = f"destination {destination.name}"
    where = destination.url if destination.type == "stow" else (
        f"{destination.ae_title}@{destination.host}:{destination.port}"
    )
    shadow = " (shadow: results are kept, not sent)" if is_shadow(destination, config) else ""
    if not network:
        return Finding(item, SKIP, f"{where}{shadow}: --no-network")
    try:
        probe = make_sender(destination, config).probe()
    except (OSError, ssl.SSLError, ValueError) as exc:
        return Finding(item, FAIL, f"{where}: {exc}")
    if not probe.reachable:
        return Finding(item, FAIL, f"{probe.detail}{shadow}")
    if destination.type == "stow":
        return Finding(item, OK, f"{probe.detail}{shadow}")
    kinds = [k for k in Kind if wants(destination, k, config)]
    refused = [k.value for k in kinds if PRODUCED_SOP_CLASS[k] not in probe.accepted]
    echo = "C-ECHO ok" if probe.echo == 0 else (
        "no C-ECHO (Verification not accepted)" if probe.echo is None else f"C-ECHO status {probe.echo}"
    )
    if refused:
        return Finding(
            item,
            FAIL,
            f"{where} accepts no presentation context for {', '.join(refused)}: those results "
            f"would be dead-lettered (configure the peer, or drop them from kinds){shadow}",
        )
    return Finding(item, OK, f"{where}: {echo}, accepts {', '.join(k.value for k in kinds)}{shadow}")
