"""The load benchmark's view of the server's processes: which they are, their RSS and CPU time, from /proc.

RSS counts pages shared between processes once per process, so a total overstates memory in use; its
growth is the number to watch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

TICK_S = 1 / os.sysconf("SC_CLK_TCK")


class Proc(NamedTuple):
    pid: int
    ppid: int
    cmdline: str
    cpu_s: float  # user + system time so far


class Sample(NamedTuple):
    name: str
    mb: float
    cpu_s: float


def processes() -> Iterator[Proc]:
    """Every process we may read."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            cmdline = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # it exited meanwhile
            continue
        fields = _stat_fields(stat)
        yield Proc(int(entry.name), int(fields[1]), cmdline, _cpu_s(fields))


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    return _cpu_s(_stat_fields(Path(f"/proc/{pid}/stat").read_text()))


def _stat_fields(stat: str) -> list[str]:
    # The command name in field 2 may hold spaces and parentheses: the fields after its last ')'.
    return stat[stat.rindex(")") + 2 :].split()


def _cpu_s(fields: list[str]) -> float:
    return (int(fields[11]) + int(fields[12])) * TICK_S


def ray_clusters() -> int:
    """How many Ray clusters run on this machine (their GCS servers)."""
    return sum("gcs_server" in p.cmdline for p in processes())


def server_processes(own_cluster: bool) -> list[Proc]:
    """The app's processes: everything below this process when it started the cluster (raylet, GCS and
    the workers Ray forks), else every Ray process by name (on a machine running other Ray apps, theirs
    too)."""
    procs = list(processes())
    if not own_cluster:
        names = ("ray::", "raylet", "gcs_server")
        return [p for p in procs if any(n in p.cmdline for n in names)]
    children: dict[int, list[Proc]] = {}
    for p in procs:
        children.setdefault(p.ppid, []).append(p)
    found, todo = [], list(children.get(os.getpid(), []))
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p.pid, []))
    return found


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """A memory line of the process's /proc status in MB (`RssAnon`: anonymous pages only); 0 once gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:  # it exited meanwhile
        pass
    return 0.0


def process_name(cmdline: str) -> str:
    """`ray::ServeReplica:csm:CSMGenerator.method` → `CSMGenerator`; a program → its file name."""
    words = cmdline.split() or ["?"]
    if words[0].startswith("ray::"):
        return words[0].removeprefix("ray::").split(".")[0].split(":")[-1]
    program = next((w for w in words if w.endswith(".py")), words[0])
    return Path(program).name


def snapshot(own_cluster: bool) -> dict[int, Sample]:
    """pid → (name, RSS MB, CPU seconds so far) of the server's processes."""
    return {
        p.pid: Sample(process_name(p.cmdline), rss_mb(p.pid), p.cpu_s) for p in server_processes(own_cluster)
    }
