"""The ``mktme-sandbox`` command line (docs/spec.md section 5).

``mount`` validates every option (``MachineConfig.validate`` and ``parse_size``
give the messages), checks that FUSE can mount here, takes the mountpoint's
lock, cleans a stale mount, starts a detached daemon and returns once the mount
answers, printing the daemon's pid; with ``--foreground`` the command *is* the
daemon and logs to stderr. The seed, a secret, reaches a daemon through its
environment only (``MKTME_SEED``): a foreground daemon given ``--seed`` on its
command line executes itself again without it. ``umount`` unmounts, stale,
stopped and wedged daemons' mounts too, never blocking on the mount. ``list``
shows the running daemons and their state. ``bench`` runs the benchmark suites;
``trace record`` records a command's memory trace (``mktme_sandbox.bench.recorder``).
``shell`` runs a command with the sandbox bound over ``/proc`` (the work is
``mktme_sandbox.procshell``'s). ``examples`` lists and runs the experiments and the tour shipped in
``mktme_sandbox.examples`` (the work is ``mktme_sandbox.examples.run_all``'s).
The mechanics live in ``mktme_sandbox.daemon``; this module only parses and reports.

Every failure is one line on stderr and exit status 1, a usage error exit
status 2 (click's rule); ``main`` turns anything unexpected into such a line
too, never a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import IO, Any

import click
from click.core import ParameterSource

from mktme_sandbox import __version__
from mktme_sandbox.config import ALGORITHMS, MachineConfig, parse_decimal, parse_size
from mktme_sandbox.daemon import (
    SEED_ENV,
    DaemonError,
    DaemonInfo,
    daemon_command,
    find_daemons,
    mount_refusal,
    run_foreground,
    start_daemon,
    stop_sandbox,
)
from mktme_sandbox.procshell import ShellError, shell_argv

__all__ = ["cli", "main"]


class _Size(click.ParamType[int, Any]):
    name = "SIZE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except ValueError as err:
            self.fail(str(err), param, ctx)


class _Seed(click.ParamType[int, Any]):
    """An integer >= 0 that is a secret: a bad one is refused without echoing it."""

    name = "INTEGER"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        seed = parse_decimal(str(value).strip())
        if seed is None:
            self.fail("expected an integer >= 0 (ASCII digits); the value is not shown", param, ctx)
        return seed


class _Names(click.ParamType[tuple[str, ...], Any]):
    name = "LIST"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[str, ...]:
        if isinstance(value, tuple):
            return value
        return tuple(name.strip() for name in value.split(",") if name.strip())


class _Mountpoint(click.Path):
    """A directory path taken as it is: ``click.Path`` would ``stat`` it, which
    blocks forever on the mount of a stopped daemon. Completion still offers
    directories."""

    def __init__(self) -> None:
        super().__init__(file_okay=False)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        return os.fsdecode(value)


SIZE, NAMES, MOUNTPOINT, SEED = _Size(), _Names(), _Mountpoint(), _Seed()


def _failing_as_click(action: Callable[[], Any]) -> Any:
    try:
        return action()
    except DaemonError as err:
        raise click.ClickException(str(err)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="mktme-sandbox")
def cli() -> None:
    """An emulated Intel MKTME machine, mounted as a FUSE filesystem.

    \b
    A first session:
      mktme-sandbox mount /tmp/m --seed 1
      echo 'type=cpu algorithm=aes-xts-128' > /tmp/m/keys/1
      mkdir /tmp/m/spaces/demo
      echo 'mmap 0x7f0000000000 64K rw- keyid=1' > /tmp/m/spaces/demo/ctl
      cat /tmp/m/README /tmp/m/spaces/demo/smaps
      mktme-sandbox umount /tmp/m

    Every file of the mount is described in MNT/README (and in the project's
    docs/filesystem.md and docs/spec.md); rejected
    commands explain themselves in /tmp/m/dmesg.

    \b
    Shell completion (bash; zsh and fish likewise):
      eval "$(_MKTME_SANDBOX_COMPLETE=bash_source mktme-sandbox)"
    """


@cli.command()
@click.argument("mountpoint", type=MOUNTPOINT)
@click.option(
    "--phys-mem",
    type=SIZE,
    default="256M",
    show_default=True,
    help="Physical memory: a multiple of 2M from 4M to 64G (suffix K, M, G or T; 256MiB too).",
)
@click.option(
    "--maxphyaddr",
    type=int,
    default=46,
    show_default=True,
    help="MAXPHYADDR: physical address bits, 32..52.",
)
@click.option(
    "--keyid-bits",
    type=int,
    default=6,
    show_default=True,
    help="KeyID bits taken from the top of MAXPHYADDR, 0..15 (0: MKTME off).",
)
@click.option(
    "--max-keys",
    type=int,
    default=63,
    show_default=True,
    help="MK_TME_MAX_KEYS, 3..32767: the keys the hardware has (the kernel, as v5,"
    " counts 2^bits - 1 KeyIDs).",
)
@click.option(
    "--algorithms",
    type=NAMES,
    default=",".join(ALGORITHMS),
    show_default=True,
    help="Activated algorithms, comma-separated, from aes-xts-128,aes-xts-256.",
)
@click.option("--tme-bypass", is_flag=True, help="KeyID 0 memory is plaintext in DRAM.")
@click.option(
    "--tme-exclude-base",
    type=SIZE,
    default="0",
    show_default=True,
    help="TME exclusion range base (IA32_TME_EXCLUDE_BASE): a multiple of its size.",
)
@click.option(
    "--tme-exclude-size",
    type=SIZE,
    default="0",
    show_default=True,
    help="TME exclusion range size, a power of two >= 4K (0: none): KeyID 0 is plaintext"
    " there, other KeyIDs stay encrypted.",
)
@click.option(
    "--cache-size",
    type=SIZE,
    default="2M",
    show_default=True,
    help="CPU cache: 0 (none) or a multiple of 64K up to 1G.",
)
@click.option(
    "--tweak-cache",
    type=SIZE,
    default="16M",
    show_default=True,
    help="Host memory for the engine's XTS tweak tables (4K a page): 0 (none) or a"
    " multiple of 4K up to 1G. Speed only: the machine behaves the same.",
)
@click.option(
    "--seed",
    type=SEED,
    default=None,
    envvar=SEED_ENV,
    show_envvar=True,
    help="Integer >= 0: CPU-generated keys and random choices become reproducible."
    " Whoever knows the seed can recompute every CPU-generated key and the TME key;"
    " on the command line every local user sees it (ps): for demonstrations only,"
    " else use MKTME_SEED or --seed-file.",
)
@click.option(
    "--seed-file",
    type=click.File("r"),
    default=None,
    help="Read the seed (one integer) from FILE, or from stdin with -.",
)
@click.option(
    "--max-keyids-per-uid",
    type=int,
    default=None,
    help="KeyIDs one user may own (root and the daemon's user: no limit) [default: half].",
)
@click.option(
    "--max-pages-per-uid",
    type=int,
    default=None,
    help="Pages one user's spaces may hold (root and the daemon's user: no limit) "
    "[default: half of memory].",
)
@click.option(
    "--swap",
    type=SIZE,
    default="16M",
    show_default=True,
    help="Swap partition (the file swap): 0 (none) or whole pages from 8K to 64G.",
)
@click.option(
    "--numa-nodes",
    type=int,
    default=1,
    show_default=True,
    help="NUMA nodes that split physical memory, 1..64 (at most one per 2M).",
)
@click.option("--allow-other", is_flag=True, help="Let other local users use the mount.")
@click.option("--foreground", is_flag=True, help="Stay attached and log to stderr.")
@click.pass_context
def mount(
    ctx: click.Context,
    /,
    mountpoint: str,
    allow_other: bool,
    foreground: bool,
    seed_file: IO[str] | None,
    **machine: Any,
) -> None:
    """Mount a new sandbox at MOUNTPOINT.

    Returns once the mount answers and prints the daemon's pid; its log file
    is named on stderr. A stale mount at MOUNTPOINT is cleaned first; a
    second mount of the same MOUNTPOINT fails. The seed reaches the daemon
    through its environment, never its command line.
    """
    seed_given = ctx.get_parameter_source("seed") is ParameterSource.COMMANDLINE
    if seed_file is not None:
        if seed_given:
            raise click.UsageError("give --seed or --seed-file, not both")
        machine["seed"] = _read_seed(seed_file)
    try:
        config = MachineConfig.from_options(None, **machine)
    except ValueError as err:
        raise click.UsageError(f"invalid machine: {err}") from None
    refusal = mount_refusal(allow_other)
    if refusal is not None:
        raise click.ClickException(refusal)
    options = {**machine, "phys_mem": config.phys_mem, "allow_other": allow_other}
    if foreground and seed_given:
        argv, env = daemon_command(mountpoint, **options)  # the seed leaves the argv
        os.execve(argv[0], argv, env)
    if foreground:
        _log_to_stderr()
        sys.exit(_failing_as_click(lambda: run_foreground(mountpoint, config, allow_other)))
    started = _failing_as_click(lambda: start_daemon(mountpoint, **options))
    click.echo(
        f"mktme-sandbox: {started.mountpoint} mounted; daemon log: {started.log_path}", err=True
    )
    click.echo(started.pid)


def _read_seed(source: IO[str]) -> int:
    seed = parse_decimal(source.read(4096).strip())
    if seed is None:  # the text is a secret: never echoed
        raise click.UsageError("--seed-file: expected one integer >= 0 (ASCII digits)")
    return seed


@cli.command()
@click.argument("mountpoint", type=MOUNTPOINT)
def umount(mountpoint: str) -> None:
    """Unmount the sandbox at MOUNTPOINT.

    Also a stale mount whose daemon died, and the mount of a stopped or
    wedged daemon (its FUSE connection is aborted first); waits until the
    daemon has ended. Never blocks on the mount.
    """
    if not _failing_as_click(lambda: stop_sandbox(mountpoint)):
        click.echo(f"{mountpoint} is not mounted")
        return
    click.echo(f"unmounted {mountpoint}")


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("mountpoint", type=MOUNTPOINT)
@click.option("--space", metavar="NAME", help="Show this space as the process $MKTME_SPACE_PID.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def shell(mountpoint: str, space: str | None, command: tuple[str, ...]) -> None:
    """Run a shell, or COMMAND after --, with the sandbox over /proc (as root).

    In private mount and PID namespaces the sandbox's mm/meminfo, mm/vmstat,
    mm/kpageflags and mm/kpagecount stand over /proc's, mm/ksm over
    /sys/kernel/mm/ksm and mm/khugepaged over
    /sys/kernel/mm/transparent_hugepage/khugepaged, so that free, vmstat -s
    and grep -r . /sys/kernel/mm/ksm show the sandbox. With --space NAME, the
    space's maps, smaps, smaps_rollup and status stand over those of a helper
    process whose pid is in $MKTME_SPACE_PID: pmap -X $MKTME_SPACE_PID.
    Exits with the command's status.
    """
    try:
        argv = shell_argv(mountpoint, space, list(command))
    except ShellError as err:
        raise click.ClickException(str(err)) from None
    os.execvp(argv[0], argv)


@cli.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of objects instead.")
def list_(as_json: bool) -> None:
    """Show running sandboxes.

    One line per daemon: pid, phys_mem, RSS, uptime, state, mountpoint. The
    state is running, stopped (SIGSTOP) or unresponsive (its mount did not
    answer within a second); a mount is never waited on longer. With --json,
    one object per daemon: pid, phys_mem (bytes; null when unknown), rss
    (bytes), uptime (seconds), state, mountpoint (null while it starts) and
    log (the daemon's log file; null for a foreground daemon).
    """
    daemons = find_daemons()
    if as_json:
        click.echo(json.dumps([_as_json(daemon) for daemon in daemons], indent=2))
        return
    if not daemons:
        click.echo("no sandbox is running", err=True)
        return
    click.echo(f"{'PID':>8}  {'PHYS_MEM':>8}  {'RSS':>8}  {'UPTIME':>9}  {'STATE':<12}  MOUNTPOINT")
    for daemon in daemons:
        click.echo(_row(daemon))


def _as_json(daemon: DaemonInfo) -> dict[str, Any]:
    return {
        "pid": daemon.pid,
        "phys_mem": daemon.phys_mem,
        "rss": daemon.rss,
        "uptime": round(daemon.uptime, 3),
        "state": daemon.state,
        "mountpoint": daemon.mountpoint,
        "log": daemon.log_path,
    }


def _human(size: int | None) -> str:
    if size is None:
        return "-"
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if size >= 1 << shift:
            return f"{size / (1 << shift):.4g}{unit}"
    return str(size)


def _row(daemon: DaemonInfo) -> str:
    uptime = time.strftime("%H:%M:%S", time.gmtime(daemon.uptime))
    days = int(daemon.uptime // 86400)
    uptime = f"{days}d{uptime}" if days else uptime
    sizes = f"{_human(daemon.phys_mem):>8}  {_human(daemon.rss):>8}"
    where = daemon.mountpoint or "(not mounted)"
    return f"{daemon.pid:>8}  {sizes}  {uptime:>9}  {daemon.state:<12}  {where}"


@cli.command()
@click.argument("suites", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option(
    "--scale-to",
    metavar="SIZE",
    help="Rows of the kernel suite's scale table up to SIZE mapped (64M, 256M, 1G, 4G; "
    "default 256M, or $MKTME_BENCH_SCALE_TO).",
)
def bench(suites: tuple[str, ...], as_json: bool, scale_to: str | None) -> None:
    """Run benchmark SUITES (default: all of them).

    \b
    Suites:
      engine  the AES-XTS engine against one bulk AES-ECB pass; CPU loads and
              stores through a KeyID; host RSS of a sparse 64 GiB machine
      kernel  page faults with MKTME on and off; a kernel-build-like trace
              with the flush-cost model of the series' cover letter; swap,
              migration, fork, COW and THP faults, KeyID 0 against 1; cost
              per page from 64 MiB mapped up (--scale-to)
      kbuild  the cover letter's table from a recorded kernel build's
              trace, and N tenants sharing the pools (docs/kbuild.md)
      fs      reads through a real mount against a null FUSE filesystem
              mounted beside it

    Every ratio is measured side by side in one run. Progress goes to stderr,
    results to stdout. A missed goal shows as MISS in the results; it does not
    fail the command.
    """
    from mktme_sandbox.bench import SUITES, run

    if scale_to is not None:
        os.environ["MKTME_BENCH_SCALE_TO"] = scale_to
    unknown = [name for name in suites if name not in SUITES]
    if unknown:
        raise click.UsageError(f"unknown suite {', '.join(unknown)} (suites: {', '.join(SUITES)})")
    run(list(suites) or None, as_json=as_json, out=sys.stdout, progress=sys.stderr)


@cli.group()
def trace() -> None:
    """Record a command's memory trace (docs/kbuild.md has the format)."""


@trace.command(name="record", context_settings={"ignore_unknown_options": True})
@click.option(
    "-o",
    "--output",
    default="trace.gz",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="The trace file (gzip; xz for a .xz name).",
)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def trace_record(output: str, command: tuple[str, ...]) -> None:
    """Run COMMAND under perf (page faults, forks, execs, exits, mmaps) and write its trace.

    \b
    Example:
      mktme-sandbox trace record -o build.trace.gz -- make -j2

    perf is installed with apt-get when missing and run as root. Prints the
    events written of each kind; exits with COMMAND's status (127, as a shell,
    when COMMAND is not found; checked before perf runs, as OUTPUT's directory).
    """
    from pathlib import Path

    from mktme_sandbox.bench.recorder import COMMAND_NOT_FOUND, find_command, record
    from mktme_sandbox.errors import SandboxError

    try:
        find_command(command)
    except SandboxError as err:
        click.echo(f"Error: {err}", err=True)
        sys.exit(COMMAND_NOT_FOUND)
    try:
        done = record(command, Path(output))
    except SandboxError as err:
        raise click.ClickException(str(err)) from None
    counts = " ".join(f"{kind}={n}" for kind, n in sorted(done.counts.items()))
    click.echo(f"{output}: {counts}")
    sys.exit(done.returncode)


@cli.group()
def examples() -> None:
    """The security experiments and the guided tour, shipped with the package.

    \b
    Each command runs against -m MNT, else $MKTME_MNT, else a fresh sandbox
    mounted for the run in a temporary directory (--seed 1) and always
    unmounted. docs/experiments.md explains each experiment.
    """


MOUNT_OPTION = click.option(
    "-m", "--mount", "mnt", metavar="MNT", help="The mountpoint (default: $MKTME_MNT, else fresh)."
)


@examples.command(name="list")
def examples_list() -> None:
    """Number, name and title of each experiment."""
    from mktme_sandbox.examples.run_all import experiments

    for e in experiments():
        click.echo(f"{e.number:>2}  {e.name:<18}  {e.title}")


@examples.command(name="run-all")
@MOUNT_OPTION
@click.option("-k", "patterns", multiple=True, metavar="TEXT", help="Only names containing TEXT.")
@click.option("--json", "as_json", is_flag=True, help="The outcomes as JSON on stdout.")
def examples_run_all(mnt: str | None, patterns: tuple[str, ...], as_json: bool) -> None:
    """Run every experiment in order, then a summary table.

    Exit status: 0 all PASS; 1 one FAILed; 2 one could not run (ERROR), or
    there is no mount.
    """
    from mktme_sandbox.examples.run_all import experiments, run_all

    chosen = [e for e in experiments() if not patterns or any(p in e.stem for p in patterns)]
    if not chosen:
        raise click.UsageError(f"no experiment matches {' or '.join(patterns)}")
    sys.exit(_on_the_mount(mnt, as_json, lambda where: run_all(where, chosen, as_json)))


@examples.command(name="run")
@MOUNT_OPTION
@click.argument("experiment", metavar="NAME|NUMBER")
def examples_run(mnt: str | None, experiment: str) -> None:
    """Run one experiment (examples list shows them); its exit status."""
    from mktme_sandbox.examples.run_all import run_all, select

    try:
        chosen = select(experiment)
    except LookupError as err:
        raise click.UsageError(str(err)) from None
    sys.exit(_on_the_mount(mnt, False, lambda where: run_all(where, [chosen])))


@examples.command(name="tour")
@MOUNT_OPTION
def examples_tour(mnt: str | None) -> None:
    """The guided tour of one machine with the mount's tools (non-interactive)."""
    import subprocess
    import sysconfig

    from mktme_sandbox.examples.run_all import tour_path

    scripts = sysconfig.get_path("scripts")
    env_path = f"{scripts}{os.pathsep}{os.environ.get('PATH', '')}"

    def tour(where: str) -> int:
        argv = ["bash", str(tour_path()), "-m", where]
        done = subprocess.run(argv, env={**os.environ, "PATH": env_path}, check=False)
        return done.returncode

    sys.exit(_on_the_mount(mnt, False, tour))


def _on_the_mount(mnt: str | None, quiet: bool, action: Callable[[str], int]) -> int:
    """``action(mountpoint)`` on the mount of -m / $MKTME_MNT or a fresh one; a
    mountpoint that is not a mount fails here once, with one line."""
    from mktme_sandbox.client import MountError
    from mktme_sandbox.examples.run_all import the_mount

    try:
        with the_mount(mnt, sys.stderr if quiet else sys.stdout) as where:
            return action(where)
    except MountError as err:
        click.echo(f"mktme-sandbox examples: {err}", err=True)
        return 2
    except KeyboardInterrupt:
        click.echo("mktme-sandbox examples: interrupted", err=True)
        return 2


def _log_to_stderr() -> None:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s mktme-sandbox[%(process)d] %(levelname)s %(message)s",
    )
    logging.getLogger("fuse").setLevel(logging.WARNING)  # mfusepy's per-errno debug lines


def main(args: list[str] | None = None) -> None:
    """The console script: click's own handling, and any other exception as
    one line ``Error: TYPE: message`` with exit status 1, never a traceback."""
    try:
        cli.main(args=args, prog_name="mktme-sandbox")
    except Exception as err:  # noqa: BLE001 - the command's last word, by contract one line
        click.echo(f"Error: {type(err).__name__}: {err}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
