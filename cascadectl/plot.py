"""PNG plots for `ppl --plot` and `bench ... --plot`: matplotlib, imported only when a plot is asked for.

matplotlib is an optional extra (`pip install 'cascadectl[plot]'`); `require()` checks for it before any work.
Figures are drawn on matplotlib's Agg canvas without pyplot (no GUI, no global state) and written atomically:
a temporary file next to the target, fsync, rename, so a failed or interrupted run never leaves half a PNG."""
from __future__ import annotations

import os

from engine.errors import CascadeError
from engine.snapshot import write_atomic

# The backslash keeps rich from taking [plot] for markup when the error is printed.
INSTALL = "pip install 'cascadectl[plot]' (or pip install matplotlib)"


def require(path: str) -> None:
    """Fail before any work when matplotlib is missing or `path` cannot be written."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CascadeError(f"--plot needs matplotlib, which is not installed: {INSTALL}") from None
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise CascadeError(f"cannot write {path}: the directory {directory} does not exist")
    if os.path.isdir(path):
        raise CascadeError(f"cannot write {path}: it is a directory; give a file name such as plot.png")


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig, path: str) -> None:
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120))


def moving_average(values, window: int):
    """Mean of each run of `window` consecutive values ([n - window + 1] points; all of them when shorter)."""
    import numpy as np

    x = np.asarray(values, dtype=np.float64)
    window = max(1, min(window, len(x)))
    c = np.concatenate([[0.0], np.cumsum(x)])
    return (c[window:] - c[:-window]) / window


def nll_by_position(path: str, series: list[tuple[str, object]], window: int = 1024) -> None:
    """`ppl --plot`: per-token NLL against position, smoothed over `window` tokens, one line per policy."""
    import numpy as np

    fig = _figure(8, 4.5)
    ax = fig.add_subplot()
    for label, nll in series:
        if len(nll) == 0:
            continue
        w = max(1, min(window, len(nll)))
        y = moving_average(nll, w)
        x = np.arange(len(y)) + w  # each point at the end of its window: the last token it averages
        step = max(1, len(y) // 4000)  # a few thousand points draw the same line as a million
        ax.plot(x[::step], y[::step], label=f"{label} (mean {float(np.mean(nll)):.3f})", linewidth=1.2)
    ax.set_xlabel("token position")
    ax.set_ylabel(f"NLL per token (moving average over {window:,} tokens)")
    ax.set_title("Streaming NLL by position")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def passkey_heatmaps(path: str, cells: list[dict], policies: list[str], prompts: list[str],
                     lengths: list[int], depths: list[float]) -> None:
    """`bench passkey --plot`: exact-key accuracy over depth × length, one panel per policy and prompt order.

    Each cell also prints its per-digit accuracy; cells a policy could not run (full past its positions) are
    left blank."""
    import numpy as np

    fig = _figure(3.2 * len(policies) + 1.2, 2.8 * len(prompts) + 0.6)
    axes = fig.subplots(len(prompts), len(policies), squeeze=False)
    index = {(c["policy"], c["prompt"], c["length"], c["depth"]): c for c in cells}
    image = None
    for row, prompt in enumerate(prompts):
        for col, policy in enumerate(policies):
            ax = axes[row][col]
            grid = np.full((len(depths), len(lengths)), np.nan)
            for i, d in enumerate(depths):
                for j, n in enumerate(lengths):
                    cell = index.get((policy, prompt, n, d))
                    if cell is None:
                        continue
                    grid[i, j] = cell["exact"]
                    ax.text(j, i, f"{cell['exact']:.0%}\n{cell['digits']:.2f}", ha="center", va="center",
                            fontsize=7, color="white" if cell["exact"] < 0.5 else "black")
            image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            ax.set_xticks(range(len(lengths)), [_tokens(n) for n in lengths])
            ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
            ax.set_title(f"{policy}, question {prompt}", fontsize=9)
            ax.set_xlabel("length (tokens)")
            if col == 0:
                ax.set_ylabel("depth of the key")
    if image is not None:
        fig.colorbar(image, ax=axes, label="exact-key accuracy", shrink=0.8)
    fig.suptitle("Passkey retrieval (cells: exact-key accuracy, per-digit accuracy)", fontsize=10)
    _save(fig, path)


def retention_curves(path: str, rows: list[dict], cache_size: int, segment_tokens: int) -> None:
    """`bench retention --plot`: the second copy's NLL against the gap, one line per policy; the no-copy
    baseline as a dashed line (one per policy where they differ), the cache size as a dotted vertical line."""
    fig = _figure(7.5, 4.5)
    ax = fig.add_subplot()
    gaps = sorted({g["gap"] for row in rows for g in row["gaps"]})
    baselines = [row["baseline"] for row in rows]
    shared = max(baselines) - min(baselines) < 1e-3  # the same prose precedes the first copy in every policy
    for row in rows:
        line = ax.plot([g["gap"] for g in row["gaps"]], [g["nll"] for g in row["gaps"]], marker="o",
                       label=row["policy"])[0]
        if not shared:
            ax.axhline(row["baseline"], color=line.get_color(), linestyle="--", linewidth=0.8,
                       label=f"{row['policy']}: no earlier copy")
    if shared:
        ax.axhline(baselines[0], color="black", linestyle="--", linewidth=0.8, label="no earlier copy")
    ax.axvline(cache_size, color="grey", linestyle=":", linewidth=1, label=f"--cache-size {cache_size:,}")
    if gaps and gaps[0] > 0:
        ax.set_xscale("log", base=2)
    else:  # a gap of 0 has no logarithm
        ax.set_xscale("symlog", base=2, linthresh=max(1, cache_size // 4))
    ax.set_xticks(gaps, [f"{_tokens(g)}\n{g / cache_size:g}x" for g in gaps])
    ax.minorticks_off()
    ax.set_xlabel("gap between the copies (tokens; multiple of the cache size)")
    ax.set_ylabel(f"mean NLL of the second copy ({segment_tokens} tokens)")
    ax.set_title("What each policy still holds: loss on a repeated segment")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def _tokens(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 and n >= 1024 else f"{n:,}"
