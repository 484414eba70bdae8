"""Options shared by the commands, grouped into the help panels Model, Cache, Prefill, Generation, Output.

Defaults come from engine.config.CacheConfig, so there is no second place that holds them. The cache options of
`ppl`, `summarize` and `ask` are declared once, in `CACHE_OPTIONS`: `@cache_options` puts them into a
command's signature in place of its `cache: CacheRequest` parameter and hands the command one `CacheRequest`
(cascadectl/settings.py), the settings object that is passed down from there."""
from __future__ import annotations

import functools
import inspect
from typing import Annotated, Callable, Optional

import typer

from engine.config import CacheConfig

_D = CacheConfig()

Sources = Annotated[
    Optional[list[str]],
    typer.Argument(help="Files, folders or PDFs to read; '-' (or nothing, with piped input) reads stdin.",
                   show_default=False),
]
Model = Annotated[
    Optional[str],
    typer.Option("--model", "-m", envvar="CASCADECTL_MODEL", rich_help_panel="Model",
                 help="Local model directory or id already in the HF cache, FILE.gguf (converted once into a "
                      "cache), or ollama:NAME[:TAG] from ollama's local store; never downloads "
                      "(default: embedded SmolLM2-135M)."),
]
Device = Annotated[str, typer.Option("--device", rich_help_panel="Model", help="auto, cpu or cuda.")]
Dtype = Annotated[str, typer.Option("--dtype", rich_help_panel="Model", help="auto, bf16, fp16 or fp32.")]
Weights = Annotated[str, typer.Option(
    "--weights", rich_help_panel="Model", metavar="auto|native|int4|int8",
    help="Decode through packed low-bit copies of the layers' weights (CPU, bf16 or fp32; prefill keeps the dense "
         "ones): int4, int8, native (none), or auto: int4 where measured lossless (a model from a 4-bit GGUF, such "
         "as the embedded one), else native; ppl, which never decodes, takes auto as native.")]
DeviceMap = Annotated[str, typer.Option("--device-map", rich_help_panel="Model",
                                        help="auto: spread the layers over all visible GPUs; none: one device.")]

Policy = Annotated[str, typer.Option("--policy", "-p", rich_help_panel="Cache",
                                     help="cascade, sink (StreamingLLM) or full (exact, quadratic).")]
CacheSize = Annotated[int, typer.Option("--cache-size", "-n", rich_help_panel="Cache",
                                        help="Cached tokens besides the sinks (fixed memory).")]
AutoCacheSize = Annotated[str, typer.Option(
    "--cache-size", "-n", rich_help_panel="Cache", metavar="TOKENS|auto",
    help="Cached tokens besides the sinks (fixed memory), or auto: an input that fits the model's positions is "
         "read exactly (full attention); a longer one through a cascade sized to the model's positions, --memory "
         "and its speed (embedded model: 4096, stride 1024).")]
Memory = Annotated[Optional[str], typer.Option(
    "--memory", rich_help_panel="Cache", show_default=False, metavar="SIZE",
    help="Memory for the KV cache with --cache-size auto, e.g. 8GiB. Default: 1/4 of available RAM on CPU, "
         "0.8 of free GPU memory after the weights on CUDA.")]
Cascades = Annotated[int, typer.Option("--cascades", "-c", rich_help_panel="Cache",
                                       help="Sub-caches; reach ~ (cache/cascades)·(2^cascades - 1) tokens.")]
Sinks = Annotated[int, typer.Option("--sinks", rich_help_panel="Cache",
                                    help="Minimum sink tokens kept forever (a pinned prompt is always kept).")]
Beta = Annotated[float, typer.Option("--beta", rich_help_panel="Cache", help="EMA decay of attention scores.")]
HeadReduce = Annotated[str, typer.Option("--head-reduce", rich_help_panel="Cache",
                                         help="Combine a KV group's query heads by max or mean.")]
Scores = Annotated[str, typer.Option(
    "--scores", rich_help_panel="Cache", metavar="exact|last:R",
    help="Which queries of a prefill chunk feed the eviction scores: exact (all), or last:R (its last R only: "
         "an approximation, see docs/ALGORITHM.md §3).")]
Stride = Annotated[int, typer.Option("--stride", "-s", rich_help_panel="Prefill",
                                     help="Prefill chunk length in tokens.")]

Json = Annotated[bool, typer.Option("--json", rich_help_panel="Output", help="Print one JSON object on stdout.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", rich_help_panel="Output", help="Only errors on stderr.")]

# name -> (option, default), in --help order; a row added here is an option of every command that reads a cache
# (and a CacheConfig keyword when CacheConfig has a field of that name: cascadectl/settings.py)
CACHE_OPTIONS: dict[str, tuple[object, object]] = {
    "policy": (Policy, _D.policy),
    "cache_size": (AutoCacheSize, "auto"),
    "memory": (Memory, None),
    "cascades": (Cascades, _D.cascades),
    "sinks": (Sinks, _D.sinks),
    "beta": (Beta, _D.beta),
    "head_reduce": (HeadReduce, _D.head_reduce),
    "scores": (Scores, _D.scores),
    "stride": (Stride, _D.stride),
}
DEFAULTS = {name: default for name, (_, default) in CACHE_OPTIONS.items() if name != "memory"}


def cache_options(command: Callable) -> Callable:
    """Declare `CACHE_OPTIONS` on `command` in place of its `cache` parameter, and call it with
    `cache=CacheRequest(...)` built from them (typer reads the command's signature, `__signature__` here). The
    command takes `ctx: typer.Context` too: it says which options were given explicitly."""
    from .settings import CacheRequest  # settings.py builds on the table above

    signature = inspect.signature(command, eval_str=True)
    params = []
    for p in signature.parameters.values():
        if p.name != "cache":
            params.append(p)
            continue
        params += [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=option, default=default)
                   for name, (option, default) in CACHE_OPTIONS.items()]

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        values = {name: kwargs.pop(name) for name in CACHE_OPTIONS}
        kwargs["cache"] = CacheRequest.from_command_line(kwargs["ctx"], values)
        return command(*args, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=params)
    return wrapper
