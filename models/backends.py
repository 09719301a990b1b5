"""Opening a generation backend by name: the one place that turns `--backend hf|vllm` into a Generator.

Rollouts, evaluation and benchmarks all call `open_generator`, so a vLLM server's lifetime (start on
the checkpoint, wait for health, stop) is the same everywhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from models.vllm_server import PLACEMENT_FIELDS as VLLM_PLACEMENT_FIELDS
from models.vllm_server import VLLMServerConfig
from search.policy import Generator, StepScorer

BACKENDS = ("hf", "vllm")


@dataclass
class BackendConfig:
    """Which engine generates, and how."""

    backend: str = field(default="hf", metadata={"help": "`hf` (in-process transformers) or `vllm` (managed OpenAI-compatible server)"})
    device: str | None = field(default=None, metadata={"help": "`hf`: torch device; None: cuda when a GPU is visible, else cpu"})
    batch_size: int = field(default=64, metadata={"help": "`hf`: sequences (prompt x sample) per forward batch"})
    prefix_cache_mb: int = field(
        default=1024,
        metadata={"help": "`hf`: memory for the key/value states of recent prompts, reused by prompts that extend "
                  "them (a search's next step); 0 turns reuse off (vLLM has its own prefix caching). The demo's "
                  "maj@8 evaluation keeps 800 chains going: at 256 it evicted them and took 69 s, at 1024 41 s"},
    )
    concurrency: int = field(default=64, metadata={"help": "`vllm`: requests in flight at once"})
    vllm_url: str | None = field(default=None, metadata={"help": "`vllm`: use this running server instead of starting one"})
    vllm: VLLMServerConfig = field(
        default_factory=VLLMServerConfig,
        metadata={"help": "`vllm`: how the managed server runs (models.vllm_server.VLLMServerConfig: GPU memory "
                  "share, tensor / data parallel sizes, ...)"},
    )
    ppm_device: str | None = field(
        default=None,
        metadata={"help": "torch device of the PPM that scores search steps and samples (e.g. cuda:7, off the "
                  "GPUs the policy's server uses); None: cuda when a GPU is visible, else cpu"},
    )

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if self.prefix_cache_mb < 0:
            raise ValueError(f"prefix_cache_mb must be >= 0, got {self.prefix_cache_mb}")


PLACEMENT_FIELDS = ("device", "ppm_device", "batch_size", "concurrency", "vllm_url", "prefix_cache_mb")
"""BackendConfig fields that say where and how fast generation runs, not what it generates. A
device's kind does count (`device_kinds`), as it sets the precision models load in."""


def device_kinds(config: BackendConfig) -> str:
    """The kinds of device the policy and the PPM load on (cpu: float32, cuda: bfloat16), None resolved
    as the backend resolves it: an index (cuda:3) does not change results, a kind does."""
    return ",".join((device or default_device()).partition(":")[0] for device in (config.device, config.ppm_device))


def generation_settings(config: BackendConfig) -> dict[str, Any]:
    """The backend settings that decide what is generated: all but the placement fields, device kinds
    in place of devices."""
    settings = {name: value for name, value in asdict(config).items() if name not in PLACEMENT_FIELDS}
    settings["vllm"] = {name: value for name, value in settings["vllm"].items() if name not in VLLM_PLACEMENT_FIELDS}
    return {**settings, "devices": device_kinds(config)}


@contextmanager
def open_generator(model: str | Path, config: BackendConfig | None = None, *, seed: int = 0) -> Iterator[Generator]:
    """Yield a Generator on `model`; a vLLM server started here is stopped on exit, whatever happens."""
    config = config or BackendConfig()
    if config.backend == "hf":
        from models.generation import HFGenerator

        generator = HFGenerator(model, device=resolve_device(config.device), batch_size=config.batch_size, seed=seed,
                                prefix_cache_mb=config.prefix_cache_mb)
        try:
            yield generator
        finally:
            generator.release()
        return
    from models.tiny import check_policy_source
    from models.vllm_server import VLLMGenerator, VLLMServer

    if config.vllm_url:  # a running server names its own models
        with VLLMGenerator(config.vllm_url, str(model), concurrency=config.concurrency, seed=seed) as generator:
            yield generator
        return
    check_policy_source(model)  # before a server starts (the hf loader checks on its own)
    with VLLMServer(model, config=config.vllm) as server:
        with VLLMGenerator(server.base_url, server.model_name, concurrency=config.concurrency, seed=seed) as generator:
            yield generator


def default_device() -> str:
    """cuda when torch sees a GPU, else cpu."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str | None) -> str:
    """`device`, or the default when None; ValueError in one line for a device torch does not know or
    a GPU it cannot see (torch would fail later, deep in loading, with a traceback)."""
    import torch

    name = device or default_device()
    try:
        parsed = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {name!r} (cpu, cuda, cuda:N, ...)") from None
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = name.partition(":")[2]  # from the text: torch.device keeps it in 8 bits (cuda:999 has index -25)
    if parsed.type == "cuda" and (int(index) if index else 0) >= visible:
        raise ValueError(f"device {name!r}: torch sees {visible} GPU(s)")
    return name


@contextmanager
def open_ppm_scorer(ppm: str | Path | None, config: BackendConfig) -> Iterator[StepScorer | None]:
    """Yield the PPM at `ppm` as a step scorer on the backend's `ppm_device` (None when `ppm` is None);
    its memory is freed on exit. A PPM that does not load raises ModelLoadError with one line."""
    if ppm is None:
        yield None
        return
    from models.ppm import PPMScorer
    from models.tiny import ModelLoadError

    try:
        scorer = PPMScorer(ppm, device=config.ppm_device)
    except Exception as err:  # noqa: BLE001 - the boundary where any loading failure becomes one message
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ModelLoadError(f"cannot load PPM {str(ppm)!r}: {reason}") from err
    try:
        yield scorer
    finally:
        scorer.release()


def require_policy_tokens(model: str | Path, step_format: str) -> None:
    """Before a COAT search or evaluation: a local policy must hold the meta-action tokens as tokens.

    Raises ValueError naming the missing ones (a tokenizer that splits `<|reflect|>` into pieces makes
    a policy that cannot write the format). Hub names and policies that do not load are left to the
    backend, which reports them when it loads the model.
    """
    path = Path(model).expanduser()
    if step_format != "coat" or not path.is_dir():
        return
    from transformers import AutoTokenizer

    from models.rl import require_coat_tokens

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return
    require_coat_tokens(tokenizer, str(model))
