"""Options shared by the commands, grouped into the help panels Model, Cache, Prefill, Generation, Output.

Defaults come from engine.config.CacheConfig, so there is no second place that holds them."""
from __future__ import annotations

from typing import Annotated, Optional

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
Stride = Annotated[int, typer.Option("--stride", "-s", rich_help_panel="Prefill",
                                     help="Prefill chunk length in tokens.")]

Json = Annotated[bool, typer.Option("--json", rich_help_panel="Output", help="Print one JSON object on stdout.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", rich_help_panel="Output", help="Only errors on stderr.")]

DEFAULTS = dict(policy=_D.policy, cache_size="auto", cascades=_D.cascades, sinks=_D.sinks, beta=_D.beta,
                head_reduce=_D.head_reduce, stride=_D.stride)
