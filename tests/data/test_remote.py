"""Shards read from data.base_url: a source that fails ends in one paragraph with its own reason and an
exit code that says whether to retry; credentials in the URL reach no file and no message."""

from __future__ import annotations

import base64
import functools
import http.server
import json
import socket
import threading
from pathlib import Path

import pytest
from conftest import train_run

from pipeline.config import load_config
from pipeline.data import remote
from pipeline.data.manifest import load_manifest
from pipeline.data.store import ShardStore, read_blocks
from pipeline.data.verify import verify_shards
from pipeline.errors import ConfigError, DataError
from pipeline.files import mask_url

TOKEN = "tok-" + "9c1e7b" * 6
USER = "bob"
FAST = ("wandb.mode=disabled", "train.max_steps=20", "eval.every_steps=20", "checkpoint.every_steps=10")


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves `directory`; with `status` set, answers every request with it; `cut`: the first `cut`
    GETs of each file send half of it and close; `auth`: the Basic credentials it requires."""

    status: int | None = None
    cut = 0
    auth: str | None = None
    seen: list[str | None]

    def log_message(self, *args):
        pass

    def _refused(self) -> bool:
        self.seen.append(self.headers.get("Authorization"))
        status = self.status
        if status is None and self.auth and self.headers.get("Authorization") != self.auth:
            status = 401
        if status is None:
            return False
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()
        return True

    def do_HEAD(self):
        if not self._refused():
            super().do_HEAD()

    def do_GET(self):
        if self._refused():
            return
        if self.cut_left.get(self.path, self.cut) > 0:
            self.cut_left[self.path] = self.cut_left.get(self.path, self.cut) - 1
            data = Path(self.translate_path(self.path)).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture
def serve():
    servers = []

    def start(directory: Path, **options) -> tuple[str, list]:
        seen: list = []
        handler = type("H", (_Handler,), {**options, "seen": seen, "cut_left": {}})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(directory)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"127.0.0.1:{server.server_address[1]}", seen

    yield start
    for server in servers:
        server.shutdown()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_mask_url():
    assert mask_url(f"https://{USER}:{TOKEN}@host:8443/shards") == "https://***@host:8443/shards"
    assert mask_url("https://t@k@host/a@b") == "https://***@host/a@b"  # an unencoded '@' in the token too
    assert mask_url(f"pipe:curl -s https://{USER}:{TOKEN}@h/x | cat") == "pipe:curl -s https://***@h/x | cat"
    for plain in ("https://host/a@b", "http://127.0.0.1:8/", "/data/fashion_mnist", "s3://bucket/x", "a@b.c"):
        assert mask_url(plain) == plain


def test_config_writes_the_masked_url_and_reads_the_real_one(tmp_path, fashion_shards):
    url = f"https://{USER}:{TOKEN}@shards.example.org/fmnist"
    cfg = load_config("configs/cpu_test.yaml", [f"data.dir={fashion_shards}", f"data.base_url={url}"])
    assert cfg.data.base_url == url, "reading uses the real URL"
    assert cfg.to_dict()["data"]["base_url"] == "https://***@shards.example.org/fmnist"
    with pytest.raises(ConfigError) as err:
        load_config("configs/cpu_test.yaml", [f"data.base_url={url}", "train.max_steps=-1"])
    assert TOKEN not in str(err.value) and "https://***@shards.example.org" in str(err.value)


def _one_paragraph(proc, code: int, url_shown: str) -> None:
    err = proc.stderr
    assert proc.returncode == code, err[-3000:]
    assert "Traceback" not in err and TOKEN not in err + proc.stdout
    assert err.count("error:") == 1 and err.strip().startswith("error:") and err.strip().count("\n") == 0, err
    assert url_shown in err and "corrupt" not in err


def test_closed_port_is_transient(tmp_path, fashion_shards):
    url = f"https://{USER}:{TOKEN}@127.0.0.1:{closed_port()}/shards"
    proc = train_run(tmp_path / "out", fashion_shards, *FAST, "data.placement=stream", f"data.base_url={url}",
                     "data.retry_s=3", check=False)
    _one_paragraph(proc, 75, mask_url(url) + "/train/")
    assert "refused" in proc.stderr and "shard server is running" in proc.stderr
    assert "(tried 3 times over 3 s)" in proc.stderr, "data.retry_s=3: pauses of 1 and 2 s"


def test_not_found_is_permanent(tmp_path, fashion_shards, serve):
    empty = tmp_path / "empty"
    empty.mkdir()
    host, _ = serve(empty)
    url = f"http://{USER}:{TOKEN}@{host}/shards"
    proc = train_run(tmp_path / "out", fashion_shards, *FAST, "data.placement=stream", f"data.base_url={url}", check=False)
    _one_paragraph(proc, 2, mask_url(url) + "/train/")
    assert "HTTP 404" in proc.stderr and "uploaded" in proc.stderr


def test_bad_credentials_are_permanent(tmp_path, fashion_shards, serve):
    host, seen = serve(fashion_shards, auth=_basic(USER, "the-right-one"))
    url = f"http://{USER}:{TOKEN}@{host}"
    proc = train_run(tmp_path / "out", fashion_shards, *FAST, "data.placement=stream", f"data.base_url={url}", check=False)
    _one_paragraph(proc, 2, mask_url(url) + "/train/")
    assert "HTTP 401" in proc.stderr and "credentials" in proc.stderr
    assert seen and seen[0] == _basic(USER, TOKEN), "the URL's credentials were sent, as basic auth"


@pytest.mark.parametrize("status,code", [(503, 75), (429, 75), (404, 2), (403, 2), (401, 2), (400, 2)])
def test_http_statuses(fashion_shards, serve, monkeypatch, status, code):
    monkeypatch.setattr(remote, "RETRY_DELAYS_S", (0.0, 0.0))
    host, seen = serve(fashion_shards, status=status)
    shard = load_manifest(fashion_shards).split("train").shards[0]
    with pytest.raises(remote.ShardStoreError) as err:
        list(read_blocks(ShardStore(str(fashion_shards), f"http://{USER}:{TOKEN}@{host}"), shard))
    assert err.value.exit_code == code and f"HTTP {status}" in str(err.value) and TOKEN not in str(err.value)
    assert len(seen) == (3 if code == 75 else 1), "only a transient failure is tried again"


def test_backoff_doubles_up_to_fifteen_seconds_within_the_budget():
    assert remote.backoff(0) == () and remote.backoff(3) == (1.0, 2.0)
    assert remote.backoff(60) == (1.0, 2.0, 4.0, 8.0, 15.0, 15.0, 15.0) and sum(remote.backoff(60)) == 60


def test_a_source_error_crosses_processes_whole():
    import pickle

    err = remote.ShardStoreError(f"http://{USER}:{TOKEN}@h/x", "the connection was refused", "check it", True)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is remote.ShardStoreError and str(back) == str(err) and back.exit_code == 75


def test_a_silent_server_times_out(fashion_shards, monkeypatch):
    monkeypatch.setattr(remote, "RETRY_DELAYS_S", ())
    monkeypatch.setattr(remote, "TIMEOUT_S", 0.3)
    with socket.socket() as silent:  # accepts connections (the backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        shard = load_manifest(fashion_shards).split("train").shards[0]
        with pytest.raises(remote.ShardStoreError) as err:
            list(read_blocks(ShardStore(str(fashion_shards), f"http://127.0.0.1:{silent.getsockname()[1]}"), shard))
    assert err.value.exit_code == 75 and "no answer within" in str(err.value)


def test_a_bad_url_is_permanent(fashion_shards):
    shard = load_manifest(fashion_shards).split("train").shards[0]
    with pytest.raises(remote.ShardStoreError) as err:
        list(read_blocks(ShardStore(str(fashion_shards), f"http://{USER}:{TOKEN}@127.0.0.1:port/x"), shard))
    assert err.value.exit_code == 2 and "not a valid URL" in str(err.value) and TOKEN not in str(err.value)


def test_a_broken_transfer_is_taken_up(fashion_shards, serve, monkeypatch):
    monkeypatch.setattr(remote, "RETRY_DELAYS_S", (0.0, 0.0))
    host, _ = serve(fashion_shards, cut=1)  # no Range support: the shard again, the part read skipped
    shard = load_manifest(fashion_shards).split("train").shards[0]
    blocks = list(read_blocks(ShardStore(str(fashion_shards), f"http://{host}"), shard))
    assert sum(len(b) for b in blocks) == shard.num_samples


def test_a_transfer_that_keeps_breaking_is_no_corrupt_shard(fashion_shards, serve, monkeypatch):
    monkeypatch.setattr(remote, "RETRY_DELAYS_S", (0.0, 0.0))
    host, _ = serve(fashion_shards, cut=99)
    shard = load_manifest(fashion_shards).split("train").shards[0]
    with pytest.raises(remote.ShardStoreError) as err:
        list(read_blocks(ShardStore(str(fashion_shards), f"http://{USER}:{TOKEN}@{host}"), shard))
    assert err.value.exit_code == 75 and "broke off" in str(err.value) and "corrupt" not in str(err.value)
    assert TOKEN not in str(err.value)


def test_bytes_that_arrived_bad_are_corrupt(tmp_path, fashion_shards, serve):
    (tmp_path / "train").mkdir()
    shard = load_manifest(fashion_shards).split("train").shards[0]
    (tmp_path / shard.url).write_bytes(b"<html>a login page</html>" * 50)
    host, _ = serve(tmp_path)
    with pytest.raises(DataError) as err:
        list(read_blocks(ShardStore(str(fashion_shards), f"http://{host}"), shard))
    assert not isinstance(err.value, remote.ShardStoreError) and "corrupt" in str(err.value)


def test_a_failing_pipe_command_is_named(fashion_shards):
    shard = load_manifest(fashion_shards).split("train").shards[0]
    with pytest.raises(remote.ShardStoreError) as err:
        list(read_blocks(ShardStore(str(fashion_shards), "pipe:exit 3;"), shard))
    assert "exited with status 3" in str(err.value) and "corrupt" not in str(err.value)


def test_verify_size_over_http(tmp_path, fashion_shards, serve):
    manifest = load_manifest(fashion_shards)
    host, _ = serve(fashion_shards)
    verify_shards(manifest, ShardStore(str(fashion_shards), f"http://{host}"), "train", "size")
    manifest.split("train").shards[3].bytes += 512
    with pytest.raises(DataError, match="train-00003.tar is .* bytes on the server"):
        verify_shards(manifest, ShardStore(str(fashion_shards), f"http://{host}"), "train", "size")


def test_verify_sha256_over_http(fashion_shards, serve):
    manifest = load_manifest(fashion_shards)
    host, _ = serve(fashion_shards)
    verify_shards(manifest, ShardStore(str(fashion_shards), f"http://{host}"), "train", "sha256")
    manifest.split("train").shards[2].sha256 = "0" * 64
    with pytest.raises(DataError, match="train-00002.tar does not match its sha256 in the manifest: the server's copy"):
        verify_shards(manifest, ShardStore(str(fashion_shards), f"http://{host}"), "train", "sha256")


@pytest.mark.slow
def test_credentials_reach_no_file_and_no_output(tmp_path, fashion_shards, serve):
    host, seen = serve(fashion_shards, auth=_basic(USER, TOKEN))
    out = tmp_path / "out"
    proc = train_run(out, fashion_shards, *FAST, "wandb.mode=offline", "data.placement=stream",
                     f"data.base_url=http://{USER}:{TOKEN}@{host}")
    assert json.loads((out / "summary.json").read_text())["completed"] and seen
    written = [out / "config.yaml", out / "metrics.jsonl", out / "summary.json", *out.glob("checkpoints/*/state.json")]
    assert len(written) >= 5 and all(p.is_file() for p in written)
    assert f"http://***@{host}" in (out / "config.yaml").read_text()
    assert json.loads(written[-1].read_text())["config"]["data"]["base_url"] == f"http://***@{host}"
    # Everything this test's run wrote: output_dir and the offline W&B run (its config and its command line).
    wandb_files = list((tmp_path / "wandb-home").rglob("*.wandb"))
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert wandb_files and leaked == [] and TOKEN not in proc.stdout + proc.stderr
