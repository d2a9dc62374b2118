"""``backend="auto"`` on CUDA: time the candidate strategies once per problem key on the user's GPU, keep the
fastest, and remember it in memory and on disk.

We cannot tune on a GPU; every user's GPU can. The first call for a key (GPU name, dtypes, M bucket, N, K, rank
bucket, dropout on/off, which gradients are needed) runs one fwd+bwd step of each candidate a few times, timed
with CUDA events, and keeps the median-fastest. Later calls with the same key are a dict lookup. Choices are
written to ``$LORAFAST_CACHE_DIR/strategies-<versions>.json`` (default ``~/.cache/lorafast``), one file per
lorafast/torch/triton version triple, so a new process does not time again and an upgrade re-times.

Verification while tuning (:mod:`lorafast.verify`): each candidate's outputs (y and every gradient) from a timing
run after its first launch (so from the cached compiled handles, as later calls run) are compared with the
``aten`` candidate's outputs of the same step (timed first; one extra untimed ``aten`` step when a caller's
candidates lack it). A candidate outside the bound is excluded, warned about once per process with the numbers,
and recorded under ``"rejected"`` in the cache file, so no process with the same versions times it again for
that key. The timing steps use seeded random adapters of the call's shapes, dtypes and strides (PEFT's lora_B
starts at zero, which would make the LoRA terms unverifiable) and a seeded random dY.

Never times while a CUDA graph is being captured or while torch.compile traces: there it takes the cached
choice, else the caller's default (``cublas``). A corrupt or unwritable cache file is ignored with one warning
(and rewritten on the next save). ``LORAFAST_STRATEGY`` overrides ``"auto"`` (see :func:`resolve`, the
choice of a strategy for a call, which lives here so the strategies registry never imports the dispatcher).
:func:`tune` pre-tunes a model's shapes with example inputs.

Timing does not touch the default RNG (a fixed dropout seed; dY and the adapters from a private generator), so
whether a key was cached or timed never changes the dropout masks a training run draws — activation
checkpointing replays the RNG and must see the same draws in its recomputation.
"""

from __future__ import annotations

import functools
import json
import os
import re
import statistics
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple

import torch

from lorafast import strategies, verify, version
from lorafast.strategies import (
    ALIASES,
    BACKENDS,
    ENV_STRATEGY,
    STRATEGIES,
    interpreting,
    triton_available,
    triton_fallback,
    warn_once,
)

ENV_CACHE_DIR = "LORAFAST_CACHE_DIR"
# Warm-up runs absorb Triton's compile and autotune (seconds on the first call of a process, once), then the
# median of TIMED_RUNS steps decides. Small: this runs inside the user's first training step.
WARMUP_RUNS = 2
TIMED_RUNS = 5
# Dropout seed used only while timing (a constant: timing must not consume the default generator).
_TIMING_SEED = 0x5EED

Runner = Callable[[], object]
MakeRun = Callable[[str], Runner]
Timer = Callable[[str, Runner], float]


def _bucket(n: int) -> int:
    """The next power of two ≥ n (≥ 1): M and r vary (sequence packing, rank patterns); tunings are shared."""
    return 1 << max(int(n) - 1, 0).bit_length()


@functools.cache
def _device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_name(index)


def _adapter_tag(x_dtype: torch.dtype, adapter_dtype: torch.dtype) -> str:
    """The adapter dtype, plus the rank-r dots' precision where it is a choice (fp32 adapters on 16-bit x:
    kernels.dtypes.set_adapter_precision), since the two precisions time differently."""
    tag = str(adapter_dtype).replace("torch.", "")
    if adapter_dtype == torch.float32 and x_dtype in (torch.float16, torch.bfloat16):
        from lorafast.kernels.dtypes import lora_dot

        fp32, precision = lora_dot(x_dtype, adapter_dtype)
        tag += f"@fp32-{precision}" if fp32 else "@compute"
    return tag


@dataclass(frozen=True)
class StrategyKey:
    """What a strategy choice depends on. ``op`` names the problem family ("lora"; QLoRA uses e.g. "nf4")."""

    op: str
    device: str
    dtype: str
    adapter_dtype: str
    m_bucket: int
    n: int
    k: int
    r_bucket: int
    dropout: bool
    needs: str

    @classmethod
    def for_call(
        cls,
        x: torch.Tensor,
        weight: torch.Tensor,
        lora_a: torch.Tensor,
        dropout_p: float,
        need_dx: bool,
        need_da: bool,
        need_db_lora: bool,
        need_dbias: bool,
        op: str = "lora",
    ) -> StrategyKey:
        """The key of a call: x (M, K) 2-D, weight (N, K) (only its shape is read), lora_a (r, K)."""
        needs = "".join(flag for flag, on in zip(("x", "a", "b", "bias"), (need_dx, need_da, need_db_lora, need_dbias))
                        if on) or "none"
        return cls(
            op=op,
            device=_device_name(x.device),
            dtype=str(x.dtype).replace("torch.", ""),
            adapter_dtype=_adapter_tag(x.dtype, lora_a.dtype),
            m_bucket=_bucket(x.shape[0]),
            n=int(weight.shape[0]),
            k=int(x.shape[1]),
            r_bucket=_bucket(lora_a.shape[0]),
            dropout=dropout_p > 0.0,
            needs=needs,
        )

    def as_string(self) -> str:
        """A stable text form, the key in the JSON cache file."""
        return "|".join(f"{k}={v}" for k, v in asdict(self).items())


# What `auto` runs when it must not time (torch.compile tracing, CUDA graph capture) and has no cached
# choice: cuBLAS's base GEMMs are never slower than ours by much, and its LoRA side work is small.
DEFAULT_CUDA = "cublas"


# ---------------------------------------------------------------------------------------------------- cache

# The cache file: {"format": 2, "versions": ..., "choices": {key: strategy}, "rejected": {key: {strategy:
# {"output", "error", "tolerance"}}}}. Format 1 (no "format", no "rejected") reads as format 2 without rejections;
# an older lorafast reads only "choices" (and never this file: its name carries the version triple).
CACHE_FORMAT = 2
# A strategy name in the file: an identifier (QLoRA adds "gemm4bit" to STRATEGIES); `select` only uses a cached
# name that is among the caller's candidates.
_NAME_RE = re.compile(r"[a-z][a-z0-9_]*")

_choices: Dict[StrategyKey, str] = {}
_by_call: Dict[tuple, str] = {}  # exact call signature -> choice (select_call's memo over _choices)
_disk: Optional[Dict[str, dict]] = None  # the file's {"choices", "rejected"}, loaded once per process (lazily)
_warned: set = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def _versions() -> str:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return f"lorafast{version.__version__}-torch{torch.__version__}-triton{triton_version}"


def cache_path() -> Path:
    """The JSON file holding this process's versions' choices."""
    root = os.environ.get(ENV_CACHE_DIR) or os.path.join(os.path.expanduser("~"), ".cache", "lorafast")
    name = "strategies-" + "".join(c if c.isalnum() or c in ".-_" else "_" for c in _versions()) + ".json"
    return Path(root) / name


def _empty() -> Dict[str, dict]:
    return {"choices": {}, "rejected": {}}


def _valid_rejection(entry: object) -> bool:
    return isinstance(entry, dict) and all(
        isinstance(name, str) and _NAME_RE.fullmatch(name) and isinstance(info, dict) for name, info in entry.items()
    )


def _read_file(path: Path) -> Dict[str, dict]:
    """The file's {"choices": {key string: strategy}, "rejected": {key string: {strategy: numbers}}}; empty (one
    warning) when it is corrupt or unreadable, empty (silently) when it does not exist yet."""
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):  # nothing cached yet (an unwritable dir warns on save)
        return _empty()
    except OSError as exc:
        _warn_once("read", f"lorafast: cannot read the strategy cache {path} ({exc}); timing again")
        return _empty()
    try:
        data = json.loads(text)
        choices = data["choices"]
        rejected = data.get("rejected", {})
        if not isinstance(choices, dict) or not all(isinstance(v, str) and _NAME_RE.fullmatch(v)
                                                    for v in choices.values()):
            raise ValueError("'choices' is not a mapping of key to strategy name")
        if not isinstance(rejected, dict) or not all(_valid_rejection(v) for v in rejected.values()):
            raise ValueError("'rejected' is not a mapping of key to {strategy: numbers}")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        _warn_once("corrupt", f"lorafast: ignoring the corrupt strategy cache {path} ({exc}); it will be rewritten")
        return _empty()
    return {"choices": dict(choices), "rejected": {k: dict(v) for k, v in rejected.items()}}


def _load_disk() -> Dict[str, dict]:
    global _disk
    if _disk is None:
        _disk = _read_file(cache_path())
    return _disk


def _save(key: StrategyKey, name: str) -> None:
    """Add one choice (and this process's rejections) to the file: re-read (another process may have written),
    merge, write atomically."""
    path = cache_path()
    disk = _load_disk()
    disk["choices"][key.as_string()] = name
    on_file = _read_file(path)
    merged = {"choices": {**on_file["choices"], **disk["choices"]}, "rejected": on_file["rejected"]}
    for k, entry in disk["rejected"].items():
        merged["rejected"][k] = {**merged["rejected"].get(k, {}), **entry}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".strategies-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"format": CACHE_FORMAT, "versions": _versions(), **merged}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:
        _warn_once("write", f"lorafast: cannot write the strategy cache {path} ({exc}); choices stay in memory")


def rejections() -> Dict[str, Dict[str, dict]]:
    """Candidates excluded by verification, from this process and the cache file: {key string: {strategy:
    {"output", "error", "tolerance"}}} (``python -m lorafast doctor`` reports them)."""
    return {k: dict(v) for k, v in _load_disk()["rejected"].items()}


def cached_choices() -> Dict[str, str]:
    """The choices of the cache file and of this process: {key string: strategy}."""
    return dict(_load_disk()["choices"])


def choices() -> Dict[StrategyKey, str]:
    """The strategies chosen (timed, or read from disk) in this process so far, by key."""
    return dict(_choices)


def clear(memory_only: bool = False) -> None:
    """Forget this process's choices (and, unless ``memory_only``, re-read the disk cache on next use and warn
    again about a bad cache file)."""
    global _disk
    _choices.clear()
    _by_call.clear()
    if not memory_only:
        _disk = None
        _warned.clear()


# --------------------------------------------------------------------------------------------------- timing

def cuda_event_timer(name: str, run: Runner) -> float:
    """Median milliseconds of ``run`` over TIMED_RUNS calls after WARMUP_RUNS, by CUDA events on the current
    stream (``name`` is for injected timers in tests)."""
    for _ in range(WARMUP_RUNS):
        run()
    start = [torch.cuda.Event(enable_timing=True) for _ in range(TIMED_RUNS)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(TIMED_RUNS)]
    for s, e in zip(start, end):
        s.record()
        run()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(start, end))


_timer: Timer = cuda_event_timer


def set_timer(timer: Optional[Timer]) -> None:
    """Replace the timer (tests inject a fake one); None restores :func:`cuda_event_timer`."""
    global _timer
    _timer = timer or cuda_event_timer


def get_timer() -> Timer:
    """The timer :func:`select` uses now (``python -m lorafast doctor`` wraps it to report the times)."""
    return _timer


def _must_not_time() -> bool:
    """Under torch.compile tracing or CUDA graph capture a timing run would be traced or captured."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class _Recorder:
    """Wraps a candidate's ``run`` for the timer and judges the outputs of its **second** call (the first that
    goes through the cached compiled handles: the first call launches through the autotuner), or of its only
    call when the timer makes one.

    With ``reference`` (aten's outputs) the second call's outputs are compared right away and dropped, so no more
    than the reference and the current call's outputs are alive at once (with CUDA events the second call is a
    warm-up, untimed). Without it (aten itself) the second call's outputs are kept as the reference.
    """

    __slots__ = ("run", "reference", "calls", "outputs", "mismatch", "verified")

    def __init__(self, run: Runner, reference: Optional[tuple]):
        self.run, self.reference, self.calls, self.outputs = run, reference, 0, None
        self.mismatch: Optional[verify.Mismatch] = None
        self.verified = False

    def __call__(self):
        if self.calls == 1:
            self.outputs = None  # a second call comes: the first one's outputs are not needed
        out = self.run()
        self.calls += 1
        if self.calls == 1:
            self.outputs = _as_outputs(out)
        elif self.calls == 2:
            self.judge(_as_outputs(out))
        return out

    def judge(self, outputs: Optional[tuple]) -> None:
        if self.reference is None or outputs is None:
            self.outputs = outputs  # the reference's (or nothing to judge)
        else:
            self.mismatch = verify.first_mismatch(outputs, self.reference)
            self.verified = True

    def finish(self) -> None:
        """After the timer: judge the only call's outputs if there was no second call."""
        if self.calls == 1 and self.outputs is not None:
            outputs, self.outputs = self.outputs, None
            self.judge(outputs)


def _reject(key: StrategyKey, candidate: str, mismatch: verify.Mismatch) -> None:
    """Exclude ``candidate`` for ``key``: record it (written with the key's choice) and warn once per candidate."""
    numbers = {"output": mismatch.output, "error": mismatch.error, "tolerance": mismatch.tolerance}
    _load_disk()["rejected"].setdefault(key.as_string(), {})[candidate] = numbers
    _warn_once(f"reject:{candidate}", (
        f"lorafast: strategy {candidate!r} gave wrong results while tuning {key.as_string()}: "
        f"{mismatch.describe()}. It is excluded there and recorded in {cache_path()} (not timed again until "
        "lorafast, torch or triton change; later exclusions of it are recorded without a warning). Please report "
        "it with the output of: python -m lorafast doctor --json report.json"))


def _as_outputs(out: object) -> Optional[tuple]:
    """A run's return value as a tuple of outputs, or None when the run returned none (a make_run that predates
    the contract: its candidates are timed unverified)."""
    if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
        return out
    return None


def _time_candidates(key: StrategyKey, candidates: Sequence[str], make_run: MakeRun) -> Dict[str, float]:
    """{candidate: ms} of the candidates that ran and agree with aten (see the module docstring)."""
    rejected = _load_disk()["rejected"].get(key.as_string(), {})
    reference: Optional[tuple] = None
    if "aten" in candidates:
        order = ["aten", *(c for c in candidates if c != "aten")]  # the reference first: only its outputs are held
    else:
        order = list(candidates)
        try:
            with torch.no_grad():
                reference = _as_outputs(make_run("aten")())
        except Exception as exc:  # reported; the candidates are then timed unverified
            _warn_once(f"noref:{key.op}", f"lorafast: the aten reference step failed ({type(exc).__name__}: {exc});"
                                          f" candidates for {key.as_string()} are not verified")
    times = {}
    for candidate in order:
        if candidate in rejected:
            continue
        is_reference = candidate == "aten" and reference is None
        try:
            recorder = _Recorder(make_run(candidate), None if is_reference else reference)
            times[candidate] = _timer(candidate, recorder)
            recorder.finish()
        except Exception as exc:  # a GPU-only failure must not break training: the other candidates remain
            _warn_once(f"fail:{candidate}", f"lorafast: strategy {candidate!r} failed while timing "
                                            f"({type(exc).__name__}: {exc}); it is skipped for {key.as_string()}")
            continue
        if is_reference:
            reference = recorder.outputs
        elif recorder.mismatch is not None:
            del times[candidate]
            _reject(key, candidate, recorder.mismatch)
        elif not recorder.verified:
            _warn_once(f"unverified:{key.op}", f"lorafast: no outputs to verify {key.op!r} candidates with "
                                               "(make_run's steps return none, or aten failed); timed unverified")
        recorder.outputs = None
    return times


def select(key: StrategyKey, candidates: Sequence[str], make_run: Optional[MakeRun], default: str) -> str:
    """The strategy for ``key``: the cached choice, else the fastest candidate by ``make_run``'s steps among those
    that agree with ``aten``.

    ``make_run(name)`` returns a zero-argument callable running one step of strategy ``name`` and returning its
    outputs (y, then each gradient, None where not needed); None: never time. Without a cached choice and when
    timing is not allowed (no make_run, compile tracing, graph capture), returns ``default``, uncached, so a later
    eager call still times. A candidate that raises is skipped with one warning; one whose outputs are outside
    :func:`lorafast.verify.tolerance` of aten's is excluded, warned about and recorded (never timed again for
    this key with these versions). If no candidate remains, ``default`` is cached.
    """
    name = _choices.get(key)
    if name is not None:
        return name
    name = _load_disk()["choices"].get(key.as_string())
    if name is not None and name in candidates:
        _choices[key] = name
        return name
    if make_run is None or _must_not_time():
        return default
    times = _time_candidates(key, candidates, make_run)
    name = min(times, key=times.get) if times else default
    _choices[key] = name
    _save(key, name)
    return name


def select_call(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    dropout_p: float,
    needs: Tuple[bool, bool, bool, bool],
    candidates: Sequence[str],
    make_run: Optional[MakeRun],
    default: str,
    op: str = "lora",
) -> str:
    """:func:`select` for one call's tensors (x (M, K), weight (N, K), lora_a (r, K)), memoised on the exact
    shapes, dtypes and device: a repeated call costs one tuple and one dict lookup (~1 µs on the 2-core CPU)
    instead of building its StrategyKey (~7 µs)."""
    if torch.compiler.is_compiling() and not all(isinstance(d, int) for d in (*x.shape, *weight.shape, *lora_a.shape)):
        return default  # symbolic sizes (dynamic shapes): reading them into a key would specialise the graph
    exact = (op, x.device, x.dtype, _adapter_tag(x.dtype, lora_a.dtype), x.shape[0], weight.shape[0], x.shape[1],
             lora_a.shape[0], dropout_p > 0.0, needs, candidates)
    name = _by_call.get(exact)
    if name is None:
        key = StrategyKey.for_call(x, weight, lora_a, dropout_p, *needs, op=op)
        name = select(key, candidates, make_run, default)
        if key in _choices:  # a real choice (not an untimed default under tracing/capture): memoise it
            _by_call[exact] = name
    return name


class StepOutputs(NamedTuple):
    """What a LoRA timing step returns: y (M, N), then dX (M, K), dA (r, K), dB (N, r), db (N,) as the strategy
    returns them (fp32 accumulators for dA, dB, db), None where not needed."""

    y: torch.Tensor
    dx: Optional[torch.Tensor]
    da: Optional[torch.Tensor]
    db: Optional[torch.Tensor]
    dbias: Optional[torch.Tensor]


def _generator(device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(_TIMING_SEED)


def _random_like(t: torch.Tensor, std: float, gen: torch.Generator) -> torch.Tensor:
    """Seeded N(0, std²) values with ``t``'s shape, dtype, device and (dense) strides."""
    out = torch.empty_like(t, memory_format=torch.preserve_format)
    return out.copy_(torch.randn(t.shape, generator=gen, device=t.device).mul_(std))


def timing_adapters(lora_a: torch.Tensor, lora_b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Seeded random stand-ins for (lora_a (r, K), lora_b (N, r)) — same shapes, dtypes, strides — for the timing
    steps: the time does not depend on the values, and verification needs a nonzero LoRA term (PEFT starts lora_B
    at zero). Scaled so the LoRA term is of the order of the base output. No draw from the default generator."""
    gen = _generator(lora_a.device)
    r, K = lora_a.shape
    return _random_like(lora_a, K ** -0.5, gen), _random_like(lora_b, r ** -0.5, gen)


def timing_seed(device: torch.device, dropout_p: float) -> Optional[torch.Tensor]:
    """The timing steps' dropout seed (a constant: the same mask for every candidate), None at p = 0."""
    return torch.full((1,), _TIMING_SEED, dtype=torch.int64, device=device) if dropout_p > 0.0 else None


def timing_grad(y: torch.Tensor) -> torch.Tensor:
    """The timing steps' dY for an output like ``y``: seeded N(0, 1e-4) values (random, so a row or column mixed
    up by a kernel shows in dX, dA, dB; small, so fp16 products stay far from overflow)."""
    return _random_like(y.contiguous(), 1e-2, _generator(y.device))


def step_runner(
    x2: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: torch.Tensor,
    p: float,
    needs: Tuple[bool, bool, bool, bool],
) -> MakeRun:
    """``make_run`` for :func:`select`: one forward (+ the needed backward) of a strategy, outside autograd, on
    x2, weight, bias and scale with the adapters of :func:`timing_adapters`, the dropout seed of
    :func:`timing_seed` and the dY of :func:`timing_grad` (no draw from the default generator; every candidate gets
    the same inputs). Each run returns :class:`StepOutputs`."""
    shared: dict = {}

    def inputs():
        if not shared:
            shared["adapters"] = timing_adapters(lora_a, lora_b)
            shared["seed"] = timing_seed(x2.device, p)
        return shared["adapters"], shared["seed"]

    def make_run(name: str) -> Runner:
        impl = strategies.get(name)

        def run() -> StepOutputs:
            (a, b), seed = inputs()
            with torch.no_grad():
                y, h = impl.forward(x2, weight, bias, a, b, scale, seed, p)
                if not any(needs):
                    return StepOutputs(y, None, None, None, None)
                if "dy" not in shared:
                    shared["dy"] = timing_grad(y)
                return StepOutputs(y, *impl.backward(shared["dy"], x2, weight, a, b, h, scale, seed, p, *needs))

        return run

    return make_run


def tune(model: torch.nn.Module, *example_inputs, **example_kwargs) -> Dict[StrategyKey, str]:
    """Pre-tune every lorafast call ``model`` makes: one forward (and backward, when the output needs grad) on
    the example inputs, so each key's strategy is timed now rather than in the first training step.

    Call it in the mode you will train in (``model.train()``: dropout and the needed grads are part of the key).
    The parameters' ``.grad`` are restored afterwards. Returns the choices made by this call (empty on CPU,
    where ``"auto"`` runs ``aten`` without timing).
    """
    before = set(_choices)
    saved = [(p, p.grad) for p in model.parameters()]
    out = model(*example_inputs, **example_kwargs)
    tensors = _output_tensors(out)
    loss = sum(t.float().sum() for t in tensors if t.requires_grad)
    if isinstance(loss, torch.Tensor):
        loss.backward()
    for p, grad in saved:
        p.grad = grad
    return {k: v for k, v in _choices.items() if k not in before}


def _output_tensors(out) -> list:
    """The floating-point tensors in a model output (tensor, tuple/list, dict or HF ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in _output_tensors(item)]
    return []


# ------------------------------------------------------------------------------------------ strategy choice

def resolve(
    backend: str,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    dropout_p: float,
    needs: Tuple[bool, bool, bool, bool],
    make_run: Optional[Callable[[str], Callable[[], object]]] = None,
    op: str = "lora",
) -> str:
    """The strategy to run for these inputs: a STRATEGIES name.

    backend: "auto" or a strategy name/alias (validated by the caller). x: (M, K) 2-D.
    needs: (need_dx, need_da, need_db_lora, need_dbias) — part of the tuning key.
    make_run: for "auto" on CUDA, ``make_run(name)`` gives a closure running one step of strategy
    ``name`` on these inputs, for the dispatcher to time (None: no timing; cached choice or default).
    op: the problem family of the tuning key (:class:`StrategyKey`), e.g. "moe64" for the grouped experts op.

    The environment variable LORAFAST_STRATEGY, when set, replaces "auto" (on CPU too).
    Explicit Triton strategies need CUDA tensors, or CPU under TRITON_INTERPRET=1 (set before triton is
    imported), else a ValueError. Valid inputs the kernels do not cover (fp64 or other dtypes, rank >
    MAX_TRITON_RANK, deterministic mode on CUDA) run ``aten`` with a one-time warning.
    """
    name = ALIASES.get(backend, backend)
    if name == "auto":
        override = os.environ.get(ENV_STRATEGY)
        if override:
            name = _override(override)
            backend = f"{override} (from {ENV_STRATEGY})"
    if name == "aten":
        return "aten"
    if name == "auto":
        if not x.is_cuda or not triton_available():
            return "aten"
        if triton_fallback(x, lora_a) is not None:
            return "aten"
        return _auto(x, weight, lora_a, dropout_p, needs, make_run, op)
    if not x.is_cuda and not interpreting():
        raise ValueError(
            f"lora_linear: backend={backend!r} needs CUDA tensors, but x is on {x.device}; on CPU set "
            "TRITON_INTERPRET=1 before importing triton (interpreter, slow) or use backend='aten'/'auto'"
        )
    if not triton_available():
        raise ValueError(f"lora_linear: backend={backend!r} needs triton, which is not installed (pip install triton)")
    reason = triton_fallback(x, lora_a)
    if reason is not None:
        warn_once(reason.split(" ")[0], f"lorafast: {reason}; running the 'aten' strategy instead of {name!r}")
        return "aten"
    return name


def _override(value: str) -> str:
    """The strategy named by LORAFAST_STRATEGY (which replaces every "auto"), or a ValueError naming it."""
    name = ALIASES.get(value, value)
    if name not in STRATEGIES and name != "auto":
        raise ValueError(f"lorafast: {ENV_STRATEGY}={value!r} is not a strategy; expected one of {BACKENDS}")
    return name


def auto_candidates(dtype: torch.dtype) -> Tuple[str, ...]:
    """The strategies ``auto`` times on CUDA for x of ``dtype``: fp32's IEEE dots run on FMA units in our GEMMs, so
    the fused path is a correctness path there and not a candidate."""
    return ("cublas", "aten") if dtype == torch.float32 else STRATEGIES


def _auto(x, weight, lora_a, dropout_p, needs, make_run, op: str = "lora") -> str:
    return select_call(x, weight, lora_a, dropout_p, needs, auto_candidates(x.dtype), make_run, default=DEFAULT_CUDA,
                       op=op)
