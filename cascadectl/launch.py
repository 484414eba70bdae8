"""`--nproc N`: `--each` over N worker processes on one host, started by cascadectl itself (no torchrun).

    cascadectl ppl corpus/ --each --nproc 4                 # 4 GPUs: one process each, NCCL
    cascadectl summarize corpus/ --each --out s/ --nproc auto
    cascadectl ppl corpus/ --each --nproc 2 --device cpu    # CPU: gloo

The parent checks the options and lists the corpus once (a bad flag is one line and exit 2 before anything
starts), then runs the same command again N times, `python -m cascadectl <the same arguments, minus --nproc>`,
with the environment torchrun would give (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR
127.0.0.1 and a free MASTER_PORT). Each worker therefore takes exactly the torchrun code path of corpus.py and
engine/distributed.py: it uses cuda:LOCAL_RANK out of every visible GPU, as under torchrun, shards the files by
size, all-reduces the sums and gathers the rows on rank 0.

Why a fresh interpreter per worker rather than torch.multiprocessing: forking a process that has imported
torch (threads, possibly CUDA) is unsafe, and `spawn` re-imports everything anyway, so the start-up cost is the
same; a subprocess also gives us each rank's stdout and stderr as separate pipes (so the parent can choose what
to show, line by line), its own process group (so Ctrl-C is forwarded once, by us) and an exit status that says
plainly whether it crashed or was killed, and there is no pickling of the Typer call. The workers are the very
processes torchrun would run, so one set of tests covers both routes.

What the parent shows: rank 0's stdout (the report or JSON; the other ranks' stdout is discarded) and, on
stderr, whole lines only, never interleaved mid-line: everything rank 0 writes, and from rank r > 0 only its
own per-file lines (`rank r: ...`); its other lines (model notices, its copy of an error rank 0 already
reports) are held back and shown only if rank 0 could not explain the exit. A worker that writes a traceback,
is killed by a signal or exits with an undocumented status is a crash: the others are stopped and the parent
prints one line naming the rank and its exit status. Exit codes are those of a one-process run: 0, 1 when a
file failed (the per-file lines and rank 0's summary say which), 2 for usage errors, 130 after Ctrl-C
(forwarded to every worker; a second one stops them at once, a third kills them)."""
from __future__ import annotations

import codecs
import contextlib
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Annotated, Optional, TextIO

import typer

from engine.errors import ConfigError

Nproc = Annotated[Optional[str], typer.Option(
    "--nproc", rich_help_panel="Output", show_default=False, metavar="N|auto",
    help="With --each: run N worker processes on this host and share the files out (auto: one per visible "
         "GPU, 1 on CPU). No torchrun needed.")]

# A worker's own exit statuses (common.py); anything else (a signal, 3, 255, ...) is a crash.
DOCUMENTED_EXITS = {0, 1, 2, 130, 141}
# Ranks finish together (the final gather and barrier); one still running this long after another exited
# with an error is waiting on a peer that will never come, so it is stopped.
GRACE_S = 30.0
KILL_AFTER_S = 5.0  # SIGTERM first, SIGKILL this long after
HELD_LINES = 200  # per rank: enough to explain any exit, bounded whatever a worker prints
TRACEBACK = "Traceback (most recent call last)"  # plain Python and typer/rich's pretty traceback alike
BOX = "│╭╮╰╯─ "  # rich traceback frame characters, stripped when quoting its last line


# ------------------------------------------------------------------------------------------------ the option


def processes(nproc: str | None, device: str, device_map: str | None) -> int:
    """How many workers `--nproc` asks for, checked before anything starts; 1 means run in this process."""
    if nproc is None:
        return 1
    n = _count(nproc, device)
    if n == 1:
        return 1
    from engine.distributed import World, rank_device, world_from_env  # torch: only once there is work to do

    if world_from_env().distributed:
        raise ConfigError("--nproc starts its own processes, but this one was started by torchrun; drop --nproc "
                          "(torchrun's --nproc-per-node already sets the count)")
    if (device_map or "none").strip().lower() == "auto":
        raise ConfigError("--device-map auto spreads one process over every GPU, but --nproc gives each process "
                          "its own GPU; use one or the other")
    rank_device(World(n - 1, n, n - 1), device)  # the last rank's device exists (and --device pins no GPU)
    return n


def _count(nproc: str, device: str) -> int:
    text = nproc.strip().lower()
    if text == "auto":
        import torch

        on_cpu = (device or "auto").strip().lower() == "cpu" or not torch.cuda.is_available()
        return 1 if on_cpu else max(1, torch.cuda.device_count())
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"--nproc takes a number of processes (1 or more) or 'auto', not {nproc!r}")
    return n


def require_each(nproc: str | None, each: bool) -> None:
    if nproc is not None and not each:
        raise ConfigError("--nproc shares the files of --each over several processes; add --each (or drop --nproc)")


# ------------------------------------------------------------------------------------------------ the launch


def run_workers(n: int, ctx: typer.Context) -> None:
    """Run the command of `ctx` in `n` worker processes; return on success, else exit with their status."""
    command = [sys.executable, "-m", "cascadectl", *worker_argv(ctx)]
    port = free_port()
    envs = [worker_env(rank, n, port) for rank in range(n)]
    code = supervise([command] * n, envs, sys.stdout, sys.stderr)
    if code:
        raise typer.Exit(code)


def worker_argv(ctx: typer.Context, drop: str = "nproc") -> list[str]:
    """The subcommand and every argument given on the command line, minus `--nproc`, in a canonical form.

    Rebuilt from the parsed parameters rather than copied from sys.argv, so it is right however the options
    were spelled (`-n 64`, `--cache-size=64`) and under a test runner too. Options given through environment
    variables are left out: the workers inherit the environment."""
    names = []
    c: typer.Context | None = ctx
    while c is not None and c.parent is not None:  # the root is the program itself
        names.insert(0, c.info_name or "")
        c = c.parent
    options: list[str] = []
    positional: list[str] = []
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name)
        if param.name == drop or source is None or source.name != "COMMANDLINE":
            continue
        value = ctx.params[param.name]
        if param.param_type_name == "argument":
            positional += [str(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
            continue
        if param.is_flag:
            spelled = param.opts if value else param.secondary_opts
            if spelled:
                options.append(max(spelled, key=len))
            continue
        name = max(param.opts, key=len)
        for v in (value if param.multiple else [value]):
            options.append(f"{name}={v}")  # '=': a value that starts with '-' stays a value
    return names + options + (["--", *positional] if positional else [])


def worker_env(rank: int, size: int, port: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """What torchrun would set for `rank` of `size` processes on one host."""
    env = dict(os.environ if base is None else base)
    env.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(size),
               GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # N processes each using every core would oversubscribe the CPU (torchrun sets 1); an explicit value stays
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // size)))
    return env


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1, for rank 0's rendezvous store. Another program could take it
    before rank 0 binds it; the start then fails, reported in one line like any worker crash."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ supervision


@dataclass
class _Rank:
    rank: int
    proc: subprocess.Popen
    tag: re.Pattern
    partial: bytes = b""  # stderr bytes after the last newline
    held: deque = field(default_factory=lambda: deque(maxlen=HELD_LINES))
    crashed: bool = False  # wrote a traceback: from then on everything it writes is held
    muted: bool = False  # being stopped by us: what it says while dying is noise
    stopped: bool = False  # we sent it a signal to stop
    code: int | None = None
    ended: float = 0.0
    wrote_error: bool = False  # an `error:` line was shown for it

    @property
    def alive(self) -> bool:
        return self.code is None


def supervise(commands: list[list[str]], envs: list[dict[str, str]], out: TextIO, err: TextIO,
              grace: float = GRACE_S) -> int:
    """Start one process per command (rank = index), show their output as the module docstring says, forward
    Ctrl-C, stop them all if one crashes; return the exit status for the whole run."""
    return _Supervisor(commands, envs, out, err, grace).run()


class _Supervisor:
    def __init__(self, commands: list[list[str]], envs: list[dict[str, str]], out: TextIO, err: TextIO,
                 grace: float) -> None:
        self.commands, self.envs, self.out, self.err, self.grace = commands, envs, out, err, grace
        self.ranks: list[_Rank] = []
        self.interrupts = 0
        self.terminated = False
        self.crash: tuple[_Rank, str] | None = None  # the first crash and how it is described
        self.stall_deadline: float | None = None
        self.kill_at: float | None = None
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")  # rank 0's stdout

    # -- signals: forwarded, never raised here (the parent must outlive its workers to report on them)

    def _on_sigint(self, signum, frame) -> None:
        self.interrupts += 1
        for r in self.ranks:
            if r.alive:
                with _gone():
                    os.kill(r.proc.pid, signal.SIGKILL if self.interrupts >= 3 else signal.SIGINT)

    def _on_sigterm(self, signum, frame) -> None:
        self.terminated = True
        self._stop_all()

    def run(self) -> int:
        previous = {}
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            previous = {s: signal.signal(s, h) for s, h in ((signal.SIGINT, self._on_sigint),
                                                          (signal.SIGTERM, self._on_sigterm))}
        try:
            for rank, (command, env) in enumerate(zip(self.commands, self.envs)):
                proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE if rank == 0 else subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, process_group=0)  # Ctrl-C reaches it through us
                self.ranks.append(_Rank(rank, proc, re.compile(rf"^(warning: )?rank {rank}: ")))
                if self.interrupts:  # Ctrl-C while the others were starting
                    with _gone():
                        os.kill(proc.pid, signal.SIGINT)
            self._pump()
        finally:
            self._stop_all()
            for r in self.ranks:
                if r.alive:
                    with _gone():
                        r.proc.kill()
                    r.code = r.proc.wait()
                for stream in (r.proc.stdout, r.proc.stderr):
                    if stream is not None:
                        stream.close()
            for s, h in previous.items():
                signal.signal(s, h)
        return self._verdict()

    # -- the loop: read whatever is ready, reap whoever exited, enforce the deadlines

    def _pump(self) -> None:
        sel = selectors.DefaultSelector()
        for r in self.ranks:
            sel.register(r.proc.stderr, selectors.EVENT_READ, (r, "err"))
            if r.proc.stdout is not None:
                sel.register(r.proc.stdout, selectors.EVENT_READ, (r, "out"))
        drain_until = None
        while True:
            ready = sel.select(timeout=0.1) if sel.get_map() else time.sleep(0.05) or []
            for key, _ in ready:
                r, stream = key.data
                data = os.read(key.fd, 1 << 16)
                if not data:
                    sel.unregister(key.fileobj)
                    if stream == "err" and r.partial:
                        self._line(r, r.partial.decode("utf-8", "replace"))
                        r.partial = b""
                elif stream == "out":
                    self._write(self.out, self.decoder.decode(data))
                else:
                    *lines, r.partial = (r.partial + data).split(b"\n")
                    for line in lines:
                        self._line(r, line.decode("utf-8", "replace"))
            self._reap()  # a closed pipe does not mean the process was reaped: wait for both
            if not any(r.alive for r in self.ranks):
                # everyone exited; a pipe still open is held by a stray grandchild: give it a moment, not forever
                drain_until = drain_until or time.monotonic() + 2.0
                if not sel.get_map() or time.monotonic() > drain_until:
                    break
        self._write(self.out, self.decoder.decode(b"", final=True))
        sel.close()

    def _line(self, r: _Rank, line: str) -> None:
        if TRACEBACK in line:
            r.crashed = True
        plain = _strip_ansi(line)
        if r.crashed or r.muted or (r.rank > 0 and not r.tag.match(plain)):
            r.held.append(plain)
            return
        r.wrote_error |= plain.startswith("error:")
        self._write(self.err, line + "\n")

    def _reap(self) -> None:
        now = time.monotonic()
        for r in self.ranks:
            if not r.alive or r.proc.poll() is None:
                continue
            r.code, r.ended = r.proc.returncode, now
            how = None if r.stopped or self.interrupts else _crash(r)
            if how and self.crash is None:
                self.crash = (r, how)
                self._stop_all()
            elif r.code != 0 and self.stall_deadline is None:
                self.stall_deadline = now + self.grace
        alive = [r for r in self.ranks if r.alive]
        if alive and self.stall_deadline is not None and now > self.stall_deadline:
            self._stop_all()
        if alive and self.kill_at is not None and now > self.kill_at:
            for r in alive:
                with _gone():
                    r.proc.kill()

    def _stop_all(self) -> None:
        for r in self.ranks:
            r.muted = True
            if r.alive and not r.stopped:
                r.stopped = True
                with _gone():
                    r.proc.terminate()
                self.kill_at = self.kill_at or time.monotonic() + KILL_AFTER_S

    # -- the outcome

    def _verdict(self) -> int:
        if self.terminated:
            self._error("terminated; the workers were stopped")
            return 128 + signal.SIGTERM
        if self.crash is not None:
            r, how = self.crash
            others = len(self.ranks) - 1
            self._error(f"rank {r.rank} {how}; stopped the other {others} process{'es' if others != 1 else ''}")
            return 1
        if self.interrupts:
            if not self.ranks or not self.ranks[0].wrote_error:
                self._error("interrupted")
            return 130
        first = self.ranks[0]
        if first.code and not first.stopped:
            return first.code  # rank 0 reported why (a file failed, a usage error, ...)
        failed = sorted((r for r in self.ranks[1:] if r.code and not r.stopped), key=lambda r: r.ended)
        if not failed:
            return 0
        r = failed[0]  # rank 0 saw nothing wrong, or was stopped waiting for r: r's own words
        said = [line.removeprefix("error:").strip() for line in r.held if line.startswith("error:")]
        for line in said or [f"exited with status {r.code}"]:
            self._error(f"rank {r.rank}: {line}")
        return r.code if r.code in DOCUMENTED_EXITS else 1

    def _error(self, message: str) -> None:
        self._write(self.err, f"error: {message}\n")

    @staticmethod
    def _write(stream: TextIO, text: str) -> None:
        if text:
            stream.write(text)
            stream.flush()


def _crash(r: _Rank) -> str | None:
    """How `r` ended if that was a crash (traceback, signal, undocumented status); None for a normal exit."""
    if r.code is not None and r.code < 0:
        try:
            name = signal.Signals(-r.code).name
        except ValueError:
            name = f"signal {-r.code}"
        return f"was killed by {name} (exit status {128 - r.code})"
    if r.crashed or r.code not in DOCUMENTED_EXITS:
        last = next((s for s in (line.strip(BOX) for line in reversed(r.held)) if s), "")
        return f"crashed with exit status {r.code}" + (f": {last}" if last else "")
    return None


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _strip_ansi(line: str) -> str:
    return _ANSI.sub("", line)


def _gone() -> contextlib.suppress:
    return contextlib.suppress(ProcessLookupError)  # it may exit between our check and our signal
