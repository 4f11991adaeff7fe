"""Downloads without network access: one short probe of each host instead of a wait of tens of seconds per mirror,
one line saying how to get the files, and the dataset root left exactly as it was.

No test here reaches the internet: every connection outside 127.0.0.1 is refused before a name is looked up, and the
mirrors are pointed at closed local ports (refused at once) or at names whose lookup never answers.
"""

import functools
import hashlib
import http.server
import socket
import tarfile
import threading
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torchvision.datasets import CIFAR10, MNIST, SVHN
from torchvision.datasets import utils as tv_utils

from advtrain.data import DataError, build_data
from advtrain.data import files
from test_data import write_cifar10

CPU = torch.device("cpu")
MNIST_GZ = [f"{stem}.gz" for stem in
            ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")]


def data_cfg(name: str, root, **keys):
    channels = 1 if "mnist" in name else 3
    cfg = dict(name=name, root=str(root), download=True, check_md5=False, train_subset=None, val_size=0,
               crop_padding=0, flip=False, mean=[0.5] * channels, std=[0.25] * channels)
    cfg = OmegaConf.create({**cfg, **keys})
    OmegaConf.set_struct(cfg, True)
    return cfg


def load(name: str, root) -> str:
    """The one-line DataError that build_data gives."""
    with pytest.raises(DataError) as info:
        build_data(data_cfg(name, root), device=CPU, seed=0, batch_size=8)
    message = str(info.value)
    assert "\n" not in message
    return message


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def closed_port() -> int:
    """A local port nothing listens on: connecting is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def connections(monkeypatch) -> list[tuple[str, int]]:
    """Every TCP connection attempted, as (host, port); any outside 127.0.0.1 is refused without a DNS lookup, but
    for names under .invalid (RFC 6761: they never resolve), whose lookup a test makes hang instead."""
    for proxy in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(proxy, raising=False)
        monkeypatch.delenv(proxy.upper(), raising=False)
    attempts = []
    real = socket.create_connection

    def connect(address, *args, **kwargs):
        attempts.append((address[0], address[1]))
        if address[0] != "127.0.0.1" and not address[0].endswith(".invalid"):
            raise ConnectionRefusedError(111, "Connection refused (tests stay off the internet)")
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", connect)
    return attempts


@pytest.fixture
def downloads(monkeypatch) -> list[str]:
    """The urls torchvision was asked to download: none, once the host is known not to answer."""
    asked, depth = [], [0]
    for name in ("download_url", "download_and_extract_archive"):
        real = getattr(tv_utils, name)

        def spy(url, *args, real=real, **kwargs):
            if not depth[0]:  # the archive's own download_url is the same request
                asked.append(url)
            depth[0] += 1
            try:
                return real(url, *args, **kwargs)
            finally:
                depth[0] -= 1

        monkeypatch.setattr(tv_utils, name, spy)
    return asked


def mnist_mirrors(monkeypatch) -> list[int]:
    ports = [closed_port(), closed_port()]
    monkeypatch.setattr(MNIST, "mirrors", [f"http://127.0.0.1:{port}/mnist/" for port in ports])
    return ports


def prepare(tmp_path: Path, root_state: str) -> Path:
    """A dataset root as the user left it: absent (its parent too), empty, or holding their own things."""
    if root_state == "absent":
        return tmp_path / "nowhere" / "data"
    root = tmp_path / "data"
    root.mkdir()
    if root_state == "holding the user's files":
        (root / "notes.txt").write_text("mine")
        (root / "MNIST").mkdir()  # empty, but theirs: it stays
        (root / "cifar-10-batches-py").mkdir()
    return root


ROOT_STATES = ["absent", "empty", "holding the user's files"]


@pytest.mark.parametrize("root_state", ROOT_STATES)
def test_offline_mnist_fails_at_the_probe_and_leaves_the_root_as_it_was(root_state, tmp_path, monkeypatch,
                                                                         connections, downloads):
    ports = mnist_mirrors(monkeypatch)
    root = prepare(tmp_path, root_state)
    before = tree(tmp_path)
    message = load("mnist", root)
    assert tree(tmp_path) == before
    assert downloads == []  # before: every mirror was tried, each a full wait offline
    assert sorted(connections) == sorted(("127.0.0.1", port) for port in ports)  # each mirror's host once
    assert message.startswith(f"could not download mnist (127.0.0.1:{ports[0]}: Connection refused; "
                              f"127.0.0.1:{ports[1]}: Connection refused); without network access, download ")
    assert ", ".join(MNIST_GZ) in message and f"into {root / 'MNIST' / 'raw'} " in message
    assert "point dataset.root=... at the folder that already holds the files" in message


@pytest.mark.parametrize("root_state", ROOT_STATES)
def test_offline_cifar_leaves_no_data_folder(root_state, tmp_path, monkeypatch, connections, downloads):
    port = closed_port()
    monkeypatch.setattr(CIFAR10, "url", f"http://127.0.0.1:{port}/cifar-10-python.tar.gz")
    monkeypatch.chdir(tmp_path)
    root = prepare(tmp_path, root_state).relative_to(tmp_path)  # "data" is the default, relative to where one stands
    before = tree(tmp_path)
    message = load("cifar10", root)
    assert tree(tmp_path) == before  # before: an empty ./data stayed behind
    assert downloads == [] and connections == [("127.0.0.1", port)]
    assert f"(127.0.0.1:{port}: Connection refused)" in message
    assert f"extract it in {tmp_path / root} (the archive holds the folder cifar-10-batches-py/ with " in message


@pytest.mark.parametrize("root_state", ["absent", "empty"])
def test_offline_svhn_leaves_the_root_as_it_was(root_state, tmp_path, monkeypatch, connections, downloads):
    pytest.importorskip("scipy")
    port = closed_port()
    for split in ("train", "test"):
        url, filename, md5 = SVHN.split_list[split]
        monkeypatch.setitem(SVHN.split_list, split, [f"http://127.0.0.1:{port}/{filename}", filename, md5])
    root = prepare(tmp_path, root_state)
    before = tree(tmp_path)
    message = load("svhn", root)
    assert tree(tmp_path) == before and downloads == [] and connections == [("127.0.0.1", port)]
    assert f"train_32x32.mat, test_32x32.mat by hand from http://127.0.0.1:{port}/ into {root}" in message


def test_a_resolver_that_never_answers_costs_one_deadline(tmp_path, monkeypatch, connections, downloads):
    """The case behind the 34-43 s: offline, each name lookup waits for a nameserver that never replies."""
    released = threading.Event()

    def never_answers(*args, **kwargs):
        released.wait(20)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", never_answers)
    monkeypatch.setattr(MNIST, "mirrors", ["https://mirror-a.invalid/mnist/", "http://mirror-b.invalid/"])
    monkeypatch.setattr(files, "PROBE_SECONDS", 0.2)
    root = prepare(tmp_path, "absent")
    try:
        message = load("mnist", root)
    finally:
        released.set()  # lets the probes that are still waiting end
    assert ("(mirror-a.invalid:443: no answer within 0.2 s; mirror-b.invalid:80: no answer within 0.2 s); without network "
            "access, download train-images-idx3-ubyte.gz") in message
    assert downloads == [] and tree(tmp_path) == []


def test_a_download_cut_off_midway_leaves_no_partial_file(tmp_path, monkeypatch, downloads):
    with socket.create_server(("127.0.0.1", 0)) as server:  # answers the probe (the kernel accepts for it)
        port = server.getsockname()[1]
        monkeypatch.setattr(MNIST, "mirrors", [f"http://127.0.0.1:{port}/mnist/"])
        monkeypatch.setattr(tv_utils, "_get_redirect_url", lambda url, max_hops: url)

        def cut_off(url, filename, chunk_size=0):
            Path(filename).write_bytes(b"\x1f\x8b the first bytes")
            raise ConnectionResetError(104, "Connection reset by peer")

        monkeypatch.setattr(tv_utils, "_urlretrieve", cut_off)
        root = prepare(tmp_path, "empty")
        message = load("mnist", root)
    assert tree(tmp_path) == ["data"]  # before: MNIST/raw/train-images-idx3-ubyte.gz, cut short, stayed
    assert downloads == [f"http://127.0.0.1:{port}/mnist/train-images-idx3-ubyte.gz"]
    assert "(ConnectionResetError: [Errno 104] Connection reset by peer)" in message


def test_the_probe_goes_through_the_proxy_urllib_would_use(tmp_path, monkeypatch, connections, downloads):
    port = closed_port()
    monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{port}")
    message = load("cifar10", tmp_path / "data")
    assert connections == [("127.0.0.1", port)]  # never straight to www.cs.toronto.edu
    assert f"(proxy 127.0.0.1:{port}: Connection refused)" in message and tree(tmp_path) == []


def test_failed_download_says_how_to_get_the_files(tmp_path):
    message = load("mnist", tmp_path)
    assert message.startswith("could not download mnist (ossci-datasets.s3.amazonaws.com:443: Connection refused")
    assert f"by hand from https://ossci-datasets.s3.amazonaws.com/mnist/ into {tmp_path / 'MNIST' / 'raw'} " in message


def test_offline_cifar_names_the_archive_the_absolute_folder_the_files_and_dataset_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    message = load("cifar10", "data")  # the default root, "data", relative to where the user stands
    assert "download cifar-10-python.tar.gz by hand from https://www.cs.toronto.edu/" in message
    assert f"extract it in {tmp_path / 'data'} (the archive holds the folder cifar-10-batches-py/ with " \
           "data_batch_1, data_batch_2, data_batch_3, data_batch_4, data_batch_5, test_batch)" in message
    assert "dataset.root=" in message


def test_download_false_names_the_files_and_both_ways_to_get_them(tmp_path, connections):
    with pytest.raises(DataError) as info:
        build_data(data_cfg("mnist", tmp_path / "nowhere", download=False), device=CPU, seed=0, batch_size=8)
    message = str(info.value)
    assert "set dataset.download=true (needs internet access)" in message and "point dataset.root=..." in message
    assert connections == [] and tree(tmp_path) == []


def test_a_host_that_answers_is_downloaded_from(tmp_path, monkeypatch, connections, downloads):
    """The probe costs a working network nothing but one connection: the archive comes and is read."""
    served = tmp_path / "served"
    write_cifar10(served)
    archive = served / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(served / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    quiet = type("Quiet", (http.server.SimpleHTTPRequestHandler,), {"log_message": lambda *args: None})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(quiet, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/cifar-10-python.tar.gz"
        monkeypatch.setattr(CIFAR10, "url", url)
        monkeypatch.setattr(CIFAR10, "tgz_md5", hashlib.md5(archive.read_bytes()).hexdigest())
        data = build_data(data_cfg("cifar10", tmp_path / "data"), device=CPU, seed=0, batch_size=8)
    finally:
        server.shutdown()
        server.server_close()
    assert (data.info.n_train, data.info.n_test) == (20, 3) and downloads == [url]
    assert (tmp_path / "data" / "cifar-10-batches-py" / "test_batch").is_file()
