"""The vLLM backend: a real server on a tiny model (slow; needs `.venv-vllm`) and the client's errors."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from models.generation import HFGenerator
from models.tiny import build_tiny_model, default_corpus
from models.vllm_server import (
    VLLMGenerator,
    VLLMRequestError,
    VLLMServer,
    VLLMServerConfig,
    VLLMServerError,
    cli_vllm,
    free_port,
    vllm_available,
)
from search.policy import Completion
from search.steps import render_prompt

requires_vllm = pytest.mark.skipif(
    not vllm_available(), reason="no vLLM environment (.venv-vllm): run `kaizen vllm install`"
)

PROMPTS = [
    render_prompt("What is 2 + 2?"),
    render_prompt("A train travels 120 km in 2 hours and then 60 km in 1 hour. What is its average speed?"),
    render_prompt("Find x if 3x = 12."),
]


def live_processes_in_group(pgid: int) -> list[int]:
    """Pids of processes in process group `pgid` that are not zombies."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        state, group = fields[0], int(fields[2])
        if group == pgid and state != "Z":
            alive.append(int(stat.parent.name))
    return alive


def port_is_closed(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


def pick_stop(text: str, *, after: int) -> str:
    """A 3-character printable ASCII piece of `text` whose first occurrence starts at `after` or later."""
    return next(
        piece
        for start in range(after, len(text) - 3)
        if (piece := text[start : start + 3]).isascii() and piece.isprintable() and text.find(piece) == start
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    corpus = default_corpus(include_shared=False)
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", corpus=corpus, num_layers=2)


@pytest.fixture(scope="module")
def server(model_dir: Path):
    # float32 like the transformers backend, so the two can be compared token for token.
    with VLLMServer(model_dir, config=VLLMServerConfig(dtype="float32")) as running:
        yield running


@pytest.fixture
def failure_logs_in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A server that fails to start keeps its log in the temporary directory; tests keep theirs out of /tmp."""
    logs = tmp_path / "tmp"
    logs.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(logs))
    return logs


@pytest.fixture
def generator(server: VLLMServer):
    with server.generator(seed=0) as client:
        yield client


def greedy(generator, prompts: list[str], *, stop: list[str] = (), max_tokens: int = 24):
    return generator.generate(prompts, n=1, stop=list(stop), temperature=0.0, max_tokens=max_tokens)


@pytest.mark.slow
@requires_vllm
class TestRunningServer:
    def test_returns_n_completions_for_every_prompt(self, generator: VLLMGenerator) -> None:
        completions = generator.generate(PROMPTS, n=3, stop=[], temperature=1.0, max_tokens=6)
        assert [len(samples) for samples in completions] == [3, 3, 3]
        assert all(sample.num_tokens <= 6 for samples in completions for sample in samples)

    def test_completions_come_back_in_prompt_order(self, generator: VLLMGenerator) -> None:
        assert greedy(generator, PROMPTS) == [greedy(generator, [prompt])[0] for prompt in PROMPTS]

    def test_stop_string_ends_the_completion_and_is_included(self, generator: VLLMGenerator) -> None:
        full = greedy(generator, PROMPTS[:1], max_tokens=40)[0][0].text
        stop = pick_stop(full, after=8)
        completion = greedy(generator, PROMPTS[:1], stop=[stop], max_tokens=40)[0][0]
        assert completion.text == full[: full.index(stop) + len(stop)]
        assert completion.finish_reason == "stop"

    def test_a_prompt_that_fills_the_context_gets_cut_off_steps(self, generator: VLLMGenerator) -> None:
        too_long = render_prompt(" ".join(f"item {index} costs {index % 9} dollars." for index in range(2000)))
        completions = generator.generate([too_long, PROMPTS[0]], n=2, stop=[], temperature=1.0, max_tokens=4)
        assert completions[0] == [Completion("", 0, "length")] * 2 and len(completions[1]) == 2

    def test_length_limit_is_reported(self, generator: VLLMGenerator) -> None:
        completion = greedy(generator, PROMPTS[:1], max_tokens=5)[0][0]
        assert (completion.num_tokens, completion.finish_reason) == (5, "length")

    def test_seeded_sampling_replays(self, server: VLLMServer) -> None:
        def two_calls() -> list:
            with server.generator(seed=11) as client:
                return [client.generate(PROMPTS, n=2, stop=[], temperature=1.0, max_tokens=8) for _ in range(2)]

        assert two_calls() == two_calls()

    def test_greedy_text_matches_the_transformers_backend(self, generator: VLLMGenerator, model_dir: Path) -> None:
        stop = ["<end_of_step>"]
        assert greedy(generator, PROMPTS, stop=stop, max_tokens=16) == greedy(HFGenerator(model_dir), PROMPTS, stop=stop, max_tokens=16)


@pytest.mark.slow
@requires_vllm
class TestServerLifecycle:
    def test_stopping_ends_every_server_process_and_frees_the_port(self, model_dir: Path) -> None:
        with VLLMServer(model_dir) as server:
            group, port = server.pid, server.port
            assert len(live_processes_in_group(group)) > 1  # API server plus engine processes
        assert live_processes_in_group(group) == []
        assert port_is_closed(port)

    @pytest.mark.usefixtures("failure_logs_in_tmp_path")
    def test_a_model_that_does_not_load_fails_with_one_clear_line(self, tmp_path: Path) -> None:
        (tmp_path / "config.json").write_text("{}")
        server = VLLMServer(tmp_path, config=VLLMServerConfig(startup_timeout_s=240))
        with pytest.raises(VLLMServerError, match="exited with code") as error:
            server.start()
        assert "\n" not in str(error.value) and str(tmp_path) in str(error.value)
        assert not server.running

    @pytest.mark.usefixtures("failure_logs_in_tmp_path")
    def test_startup_timeout_stops_the_server(self, model_dir: Path) -> None:
        server = VLLMServer(model_dir, config=VLLMServerConfig(startup_timeout_s=3))
        started = time.monotonic()
        with pytest.raises(VLLMServerError, match="did not become healthy within 3 s"):
            server.start()
        assert time.monotonic() - started < 60
        assert not server.running

    @pytest.mark.usefixtures("failure_logs_in_tmp_path")
    def test_cli_serve_on_a_broken_model_exits_non_zero_with_one_line(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        (tmp_path / "config.json").write_text("{}")
        assert cli_vllm(["serve", "--model", str(tmp_path), "--timeout", "240"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("kaizen vllm: error: vLLM server for") and err.count("\n") == 1
        assert "model_type" in err  # the root cause from the server log, not a generic failure


def test_a_failed_start_keeps_its_log_and_names_it(tmp_path: Path, failure_logs_in_tmp_path: Path) -> None:
    fake_python = tmp_path / "python"  # a server that dies during startup, as vLLM does on a bad model
    fake_python.write_text("#!/bin/sh\necho 'ValueError: no model_type in config.json'\nexit 1\n")
    fake_python.chmod(0o755)
    server = VLLMServer(tmp_path, python=fake_python, config=VLLMServerConfig(startup_timeout_s=30))
    with pytest.raises(VLLMServerError) as error:
        server.start()
    [log] = failure_logs_in_tmp_path.glob("kaizen-vllm-*.log")
    assert f"(log: {log})" in str(error.value) and "no model_type" in log.read_text()


def test_missing_environment_is_a_clear_error(tmp_path: Path) -> None:
    server = VLLMServer(tmp_path, python=tmp_path / "no-venv" / "bin" / "python")
    with pytest.raises(VLLMServerError, match="kaizen vllm install"):
        server.start()


def test_missing_model_directory_fails_before_starting_anything(tmp_path: Path) -> None:
    server = VLLMServer(tmp_path / "missing", python=sys.executable)
    with pytest.raises(VLLMServerError, match="no such directory"):
        server.start()
    assert server.pid is None


def test_unreachable_server_raises_request_error() -> None:
    with VLLMGenerator(f"http://127.0.0.1:{free_port()}", "model") as client:
        with pytest.raises(VLLMRequestError, match="cannot reach"):
            client.generate(PROMPTS[:1], n=1, stop=[], temperature=0.0, max_tokens=4)


def _sent_seeds(prompts: list[str], temperature: float = 1.0) -> dict[str, int | None]:
    """The seed each prompt's request carried, from a client whose requests never leave it."""
    sent: dict[str, int | None] = {}

    def complete(payload: dict) -> list:
        sent[payload["prompt"]] = payload.get("seed")
        return []

    with VLLMGenerator("http://127.0.0.1:9", "m", seed=5) as client:
        client._complete = complete
        client.generate(prompts, n=2, stop=[], temperature=temperature, max_tokens=4)
    return sent


def test_a_requests_seed_follows_its_prompt_not_the_other_prompts_of_the_call() -> None:
    assert _sent_seeds(["b"])["b"] == _sent_seeds(["a", "b", "c"])["b"]


def test_greedy_requests_carry_no_seed() -> None:
    assert _sent_seeds(["a"], temperature=0.0) == {"a": None}


def test_server_binds_loopback_with_prefix_caching_by_default(tmp_path: Path) -> None:
    command = VLLMServer(tmp_path).command()
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert "--enable-prefix-caching" in command


def test_eager_mode_is_the_cpu_default_and_can_be_turned_off(tmp_path: Path) -> None:
    assert "--enforce-eager" in VLLMServer(tmp_path).command()  # this machine has no GPU
    assert "--enforce-eager" not in VLLMServer(tmp_path, config=VLLMServerConfig(enforce_eager=False)).command()


def test_gpu_placement_settings_reach_the_command(tmp_path: Path) -> None:
    config = VLLMServerConfig(gpu_memory_utilization=0.7, tensor_parallel_size=2, data_parallel_size=4)
    command = VLLMServer(tmp_path, config=config).command()
    flags = {flag: command[command.index(flag) + 1] for flag in
             ("--gpu-memory-utilization", "--tensor-parallel-size", "--data-parallel-size")}
    assert flags == {"--gpu-memory-utilization": "0.7", "--tensor-parallel-size": "2", "--data-parallel-size": "4"}


@pytest.mark.parametrize("settings", [{"gpu_memory_utilization": 1.5}, {"gpu_memory_utilization": 0.0},
                                      {"data_parallel_size": 0}, {"tensor_parallel_size": 0}])
def test_impossible_gpu_placement_is_refused(settings: dict) -> None:
    with pytest.raises(ValueError):
        VLLMServerConfig(**settings)


def test_server_does_not_outlive_a_killed_parent(tmp_path: Path) -> None:
    """A flow process killed outright (SIGKILL) must not leave its server holding the GPUs."""
    pid_file = tmp_path / "server.pid"
    fake_python = tmp_path / "python"  # stands in for the vLLM interpreter: records its pid, then idles
    fake_python.write_text(f"#!/bin/sh\necho $$ > {pid_file}\nexec sleep 60\n")
    fake_python.chmod(0o755)
    starter = subprocess.Popen([sys.executable, "-c", (
        "from models.vllm_server import VLLMServer, VLLMServerConfig\n"
        f"VLLMServer({str(tmp_path)!r}, python={str(fake_python)!r}, "
        "config=VLLMServerConfig(startup_timeout_s=60)).start()\n"
    )], cwd=Path(__file__).resolve().parents[1], env={**os.environ, "TMPDIR": str(tmp_path)})  # a killed starter cannot clean up
    try:
        deadline = time.monotonic() + 30
        while not (pid_file.exists() and pid_file.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.1)
        server_pid = int(pid_file.read_text())
        os.kill(starter.pid, signal.SIGKILL)
        starter.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and process_is_live(server_pid):
            time.sleep(0.1)
        assert not process_is_live(server_pid)
    finally:
        starter.kill()
        starter.wait()


def process_is_live(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


FAKE_SERVER = """
import http.server, json, socket, sys
port = int(sys.argv[sys.argv.index("--port") + 1])
names = sys.argv[sys.argv.index("--served-model-name") + 1:sys.argv.index("--host")]
try:
    server = http.server.HTTPServer(("127.0.0.1", port), http.server.BaseHTTPRequestHandler)
except OSError as error:
    print(f"OSError: {error}", flush=True)
    sys.exit(1)
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        if self.path == "/v1/models":
            self.wfile.write(json.dumps({"data": [{"id": name} for name in names]}).encode())
    def log_message(self, *args):
        pass
server.RequestHandlerClass = Health
server.serve_forever()
"""


def fake_vllm(tmp_path: Path, preamble: str = "") -> Path:
    """An interpreter path that runs FAKE_SERVER: answers /health and /v1/models, or fails to bind as vLLM does."""
    script = tmp_path / "fake_server.py"
    script.write_text(preamble + FAKE_SERVER)
    fake_python = tmp_path / "python"
    fake_python.write_text(f"#!/bin/sh\nexec {sys.executable} {script} \"$@\"\n")
    fake_python.chmod(0o755)
    return fake_python


def test_a_port_taken_before_the_server_binds_it_is_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Servers of parallel shards can race for the same free port; the loser picks another."""
    fake_python = fake_vllm(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        taken_port = taken.getsockname()[1]
        ports = iter([taken_port, free_port()])
        monkeypatch.setattr("models.vllm_server.free_port", lambda host="127.0.0.1": next(ports))
        with VLLMServer(tmp_path, python=fake_python, config=VLLMServerConfig(startup_timeout_s=30)) as server:
            assert server.port != taken_port and server.running


def test_temporary_files_the_server_leaves_are_removed_when_it_stops(tmp_path: Path) -> None:
    """vLLM never removes its IPC sockets and rendezvous files; nightly runs must not pile them up in /tmp."""
    # Like vLLM: a rendezvous file in the temporary directory and a socket under VLLM_RPC_BASE_PATH.
    fake_python = fake_vllm(tmp_path, preamble=(
        "import os, tempfile\n"
        "open(os.path.join(tempfile.gettempdir(), 'vllm_dist_test'), 'w').close()\n"
        "open(os.path.join(os.environ['VLLM_RPC_BASE_PATH'], 'engine.sock'), 'w').close()\n"
    ))
    with VLLMServer(tmp_path, python=fake_python, config=VLLMServerConfig(startup_timeout_s=30)) as server:
        scratch = server._scratch
        assert scratch is not None and {path.name for path in scratch.iterdir()} == {"vllm_dist_test", "engine.sock"}
    assert not scratch.exists()


def test_another_server_answering_on_the_port_is_not_taken_for_this_one(
    tmp_path: Path, failure_logs_in_tmp_path: Path
) -> None:
    """/health answers 200 on any vLLM server: a leftover one on a fixed port must not pass for ours."""
    (tmp_path / "other").mkdir()
    port = free_port()
    other = subprocess.Popen([fake_vllm(tmp_path / "other"), "--port", str(port), "--served-model-name", "other", "--host"])
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not answers(port):
            time.sleep(0.1)
        server = VLLMServer(tmp_path, python=fake_vllm(tmp_path), config=VLLMServerConfig(port=port, startup_timeout_s=30))
        with pytest.raises(VLLMServerError, match="(?i)address already in use"):
            server.start()
    finally:
        other.kill()
        other.wait()


def answers(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_a_server_that_cannot_be_launched_fails_in_one_line_and_leaves_no_scratch(
    tmp_path: Path, failure_logs_in_tmp_path: Path
) -> None:
    not_executable = tmp_path / "python"
    not_executable.write_text("")
    server = VLLMServer(tmp_path, python=not_executable)
    with pytest.raises(VLLMServerError, match="cannot start the vLLM server") as error:
        server.start()
    assert "\n" not in str(error.value) and list(failure_logs_in_tmp_path.iterdir()) == []


def test_a_prompt_that_leaves_no_room_for_output_gets_a_cut_off_step() -> None:
    """vLLM lets a prompt of exactly the context's length through, then refuses max_tokens 0."""
    import httpx

    def refuse(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"error": {"message": "max_tokens must be at least 1, got 0."}})

    with VLLMGenerator("http://127.0.0.1:9", "m") as client:
        client._client = httpx.Client(base_url=client.base_url, transport=httpx.MockTransport(refuse))
        assert client.generate(PROMPTS[:1], n=2, stop=[], temperature=1.0, max_tokens=4) == [[Completion("", 0, "length")] * 2]
