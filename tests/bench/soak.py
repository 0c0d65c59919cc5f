#!/usr/bin/env python3
"""Soak (issue 17): simulated agents on one flotte-server for an hour, with
churn, while the server's resources are sampled; then a verdict and a plot.

Churn, as an operator's day would bring it:
  * sessions dropped and re-established (flotte-loadgen --churn-per-minute),
  * a relabel every minute,
  * an access change every minute (a user granted, then revoked),
  * a staged rollout of a new image every 10 minutes (simulated swaps),
  * a quarantine and its release every 30 minutes.
Every 10 s: the server's RSS (and the kernel's split of it: anonymous,
file-backed, shared memory), open descriptors, tasks (threads) and its
database connections (descriptors open on the SQLite files), and from its
/metrics the bytes its allocator says are allocated (live data) and
resident (live data and pages kept): RSS rising with a flat allocated line
is memory kept, not a leak. The verdict: RSS growth between minute 10 and
minute 60 under 5 %, descriptors flat, judged two ways side by side: one
sample at each end (as earlier runs were), and the median of the last
minute of the rollout cycle at each end (minutes 10-11 against 59-60), since
a single sample swings by as much as the bound around a rollout. The
medians of every rollout cycle show whether a longer run levels off.

usage: soak.py [--agents 1000] [--minutes 60] [--rollout-every 10] [--out DIR]
               [--server-wrapper "heaptrack -o /tmp/flotte-soak/heap"]
               [--compare-with EARLIER/samples.csv --compare-label "before"]
       soak.py --redraw DIR [--minutes M] [--compare-with ...]
                 (judge and plot a finished run's DIR/samples.csv again, e.g.
                 beside a run that ended after it; runs nothing)
Release binaries come from $B (default /work/target-bench/release); the
plot needs matplotlib. Not in CI: it runs for an hour.
"""

import argparse
import csv
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BINARIES = Path(os.environ.get("B", "/work/target-bench/release"))
SAMPLE_EVERY = 10
LOADGEN_LIMITS = (Path(__file__).parent / "loadgen-limits.toml").read_text()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--minutes", type=int, default=60)
    parser.add_argument("--churn-per-minute", type=int, default=20)
    parser.add_argument("--rollout-every", type=int, default=10, metavar="MINUTES",
                        help="a 1 000-machine rollout every this many minutes (a shorter trial: 3)")
    parser.add_argument("--server-wrapper", default="",
                        help="a command the server runs under, split on spaces (e.g. heaptrack -o FILE); "
                             "its RSS is still the server's own, found as the wrapper's descendant")
    parser.add_argument("--compare-with", type=Path, metavar="CSV",
                        help="an earlier run's samples.csv, drawn beside this run's in the plot")
    parser.add_argument("--compare-label", default="earlier run", help="the earlier run's name in the plot")
    parser.add_argument("--out", type=Path, default=Path("/tmp/flotte-soak"))
    parser.add_argument("--redraw", type=Path, metavar="DIR",
                        help="a finished run's --out: its verdict and plot made again from its samples "
                             "(with the run's --minutes and --rollout-every); nothing runs")
    arguments = parser.parse_args()
    # Read before anything runs: a missing file is said now, not after an hour.
    earlier = read_samples(arguments.compare_with) if arguments.compare_with else None
    if arguments.redraw:
        samples = read_samples(arguments.redraw / "samples.csv")
        write_results(arguments.redraw, samples, arguments, earlier, samples_written=True)
        return
    out = arguments.out
    subprocess.run(["rm", "-rf", str(out)], check=True)
    out.mkdir(parents=True)
    data = out / "server"
    run([BINARIES / "flotte-server", "init", "--data-dir", data, "--listen", "127.0.0.1:0"])
    with open(data / "server.toml", "a") as settings:
        settings.write(LOADGEN_LIMITS)
    server_log = open(out / "server.log", "w")
    server = subprocess.Popen(
        arguments.server_wrapper.split()
        + [BINARIES / "flotte-server", "run", "--data-dir", data, "--metrics-listen", "127.0.0.1:0"],
        stdout=server_log,
        stderr=subprocess.STDOUT,
    )
    while not (data / "server.address").exists() or not (data / "server.address").read_text().endswith("\n"):
        time.sleep(0.05)
    address = (data / "server.address").read_text().strip()
    server_pid = server_process_id(server.pid)
    ctl = Operator(data / "admin", address)
    keys = out / "keys"
    ctl.run("image", "keygen", "--out", keys)
    ctl.run("image", "trust", "add", keys / "release.pub")
    tree = out / "tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin" / "app").write_text("#!/bin/sh\nexec sleep infinity\n")
    (tree / "bin" / "app").chmod(0o755)
    plan = out / "plan.toml"
    plan.write_text(
        '[[stage]]\nname = "canary"\nbatch = "1%"\nbake = "10s"\n\n'
        '[[stage]]\nname = "rest"\nbatch = "50%"\nbake = "10s"\n\n'
        '[policy]\nmax_failures = 5\nmachine_deadline = "120s"\non_failure = "halt"\n'
    )
    loadgen_log = open(out / "loadgen.log", "w")
    loadgen = subprocess.Popen(
        [
            BINARIES / "flotte-loadgen", "--profile", data / "admin", "--server", address,
            "--agents", str(arguments.agents),
            "--duration", f"{arguments.minutes * 60 + 120}s",
            "--churn-per-minute", str(arguments.churn_per_minute),
            # Makes the simulated agents answer swaps (the load generator's
            # own rollout, after its window, is never reached here).
            "--rollout-image", "app@1.0.1",
        ],
        stdout=loadgen_log,
        stderr=subprocess.STDOUT,
    )
    while "established" not in (out / "loadgen.log").read_text():
        if loadgen.poll() is not None:
            sys.exit("the load generator stopped:\n" + (out / "loadgen.log").read_text())
        time.sleep(1)
    print("sessions established; soaking for", arguments.minutes, "minutes", flush=True)

    samples = []
    started = time.monotonic()
    next_sample = started
    next_minute = started + 60
    minute = 0
    granted = False
    version = 0
    try:
        while time.monotonic() - started < arguments.minutes * 60:
            now = time.monotonic()
            if now >= next_sample:
                samples.append(sample(server_pid, data, (now - started) / 60))
                next_sample += SAMPLE_EVERY
            if now >= next_minute:
                minute += 1
                next_minute += 60
                hostnames = [m["hostname"] for m in ctl.json("machines", "list")]
                ctl.run("machines", "label", random.choice(hostnames), "--set", f"soak-minute={minute}")
                # A revoked user's name is never reused: one user per cycle,
                # added one minute and revoked the next.
                user = f"soaker{minute - 1 if granted else minute}"
                if granted:
                    ctl.run("user", "revoke", user)
                else:
                    ctl.run("user", "add", user, "--ssh-key", keys / "soaker.pub", create_key=keys / "soaker")
                    ctl.run("access", "grant", user, "--selector", "zone=zone-1", "--login", "soaker")
                granted = not granted
                if is_rollout_minute(minute, arguments):
                    version += 1
                    image = out / f"app-{version}.flotte"
                    ctl.run("image", "build", tree, "--name", "app", "--version", f"1.0.{version}",
                            "--key", keys / "release.key", "--out", image, "--service", "bin/app")
                    ctl.run("image", "push", image)
                    ctl.run("rollout", "create", "--image", f"app@1.0.{version}", "--plan", plan)
                if minute % 30 == 5:
                    victim = random.choice(hostnames)
                    ctl.run("machines", "quarantine", victim, "--reason", "soak")
                    ctl.run("machines", "release", victim)
                print(f"minute {minute}: {samples[-1]}", flush=True)
            time.sleep(0.5)
    finally:
        loadgen.send_signal(signal.SIGTERM)
        # To the server itself: a wrapper need not pass signals on.
        os.kill(server_pid, signal.SIGTERM)
        loadgen.wait()
        server.wait()
    write_results(out, samples, arguments, earlier)


def is_rollout_minute(minute, arguments):
    """Rollouts start at minute 1 and every --rollout-every minutes after."""
    return minute % arguments.rollout_every == 1 % arguments.rollout_every


def server_process_id(launched):
    """The flotte-server process itself: the launched process, or under a
    wrapper (heaptrack runs it as a child) the descendant running the binary."""
    pending = [launched]
    while pending:
        pid = pending.pop()
        try:
            if Path(f"/proc/{pid}/exe").resolve().name == "flotte-server":
                return pid
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        pending.extend(int(child) for child in children)
    sys.exit(f"no flotte-server process under process {launched}")


def run(command, **kwargs):
    return subprocess.run([str(part) for part in command], check=True, capture_output=True, text=True, **kwargs)


class Operator:
    def __init__(self, profile, address):
        self.base = [BINARIES / "flottectl", "--profile", profile, "--server", address]

    def run(self, *arguments, create_key=None):
        if create_key is not None and not Path(create_key).exists():
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", create_key])
        result = subprocess.run([str(part) for part in self.base + list(arguments)], capture_output=True, text=True)
        if result.returncode != 0:
            print("flottectl", *arguments, "failed:", result.stderr.strip(), flush=True)
        return result.stdout

    def json(self, *arguments):
        return json.loads(self.run(*arguments, "-o", "json") or "[]")


def allocator_mib(data):
    """The allocator's gauges from the server's /metrics, in MiB (None when
    the server does not publish them, as before they existed)."""
    address = (data / "metrics.address").read_text().strip()
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        text = response.read().decode()
    gauges = {}
    for line in text.splitlines():
        for name in ("allocated", "resident"):
            if line.startswith(f"flotte_allocator_{name}_bytes "):
                gauges[name] = round(float(line.split()[1]) / 1024 / 1024, 1)
    return gauges.get("allocated"), gauges.get("resident")


def sample(pid, data, minutes):
    allocated, allocator_resident = allocator_mib(data)
    status = Path(f"/proc/{pid}/status").read_text()
    kib = {line.split(":")[0]: int(line.split()[1]) for line in status.splitlines()
           if line.startswith(("VmRSS", "RssAnon", "RssFile", "RssShmem"))}
    descriptors = os.listdir(f"/proc/{pid}/fd")
    database = 0
    for descriptor in descriptors:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{descriptor}")
        except OSError:
            continue
        if target.startswith(str(data)) and ".db" in target:
            database += 1
    return {
        "minute": round(minutes, 2),
        "rss_mib": round(kib["VmRSS"] / 1024, 1),
        # The kernel's split of the RSS: the heap and stacks; pages of files
        # (the binary, libraries, SQLite's mapped WAL index); shared memory.
        # Which one moves says whether a creep is the allocator's at all.
        "rss_anonymous_mib": round(kib["RssAnon"] / 1024, 1),
        "rss_file_mib": round(kib["RssFile"] / 1024, 1),
        "rss_shared_memory_mib": round(kib["RssShmem"] / 1024, 1),
        "descriptors": len(descriptors),
        "tasks": len(os.listdir(f"/proc/{pid}/task")),
        "database_files_open": database,
        "allocated_mib": allocated if allocated is not None else "",
        "allocator_resident_mib": allocator_resident if allocator_resident is not None else "",
    }


def at_minute(samples, minute):
    return min(samples, key=lambda row: abs(row["minute"] - minute))


WINDOW_MINUTES = 1


def median_over(samples, key, first_minute, end_minute):
    """The median of `key` over the samples in [first_minute, end_minute);
    None when there are none (or the column was empty)."""
    values = [row[key] for row in samples
              if first_minute <= row["minute"] < end_minute and row[key] not in ("", None)]
    return round(statistics.median(values), 2) if values else None


def growth_percent(first, last):
    if first is None or last is None:
        return None
    return round((last - first) / first * 100, 2)


def read_samples(path):
    with open(path, newline="") as file:
        # An earlier run may lack a column (or its values): those are None.
        return [{key: float(value) if value else None for key, value in row.items()}
                for row in csv.DictReader(file)]


def write_results(out, samples, arguments, earlier, samples_written=False):
    if not samples_written:
        with open(out / "samples.csv", "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(samples[0]))
            writer.writeheader()
            writer.writerows(samples)
    # Growth is judged after the warm-up (minute 10 of an hour; a sixth of
    # a shorter trial run) up to minute 60 (the goal's end; a longer run
    # says what came after separately).
    warm_up = min(10, arguments.minutes / 6)
    goal_end = min(60, arguments.minutes)
    start = at_minute(samples, warm_up)
    end = at_minute(samples, goal_end)
    allocated = [row["allocated_mib"] for row in (start, end)]
    window = [row for row in samples if row["minute"] >= warm_up]

    def end_medians(key):
        """The medians of `key` over the last minute of a rollout cycle at
        each end of the goal's window."""
        return (median_over(samples, key, warm_up, warm_up + WINDOW_MINUTES),
                median_over(samples, key, goal_end - WINDOW_MINUTES, goal_end + 0.01))

    start_window, end_window = end_medians("rss_mib")
    cycles = []
    for first in range(1, arguments.minutes, arguments.rollout_every):
        last = min(first + arguments.rollout_every, arguments.minutes + 0.01)
        cycles.append({"minutes": [first, round(last)],
                       "rss_mib_median": median_over(samples, "rss_mib", first, last),
                       "allocated_mib_median": median_over(samples, "allocated_mib", first, last),
                       "rss_anonymous_mib_median": median_over(samples, "rss_anonymous_mib", first, last)})
    split_growth = {}
    for key in ("rss_anonymous_mib", "rss_file_mib", "rss_shared_memory_mib"):
        at_start, at_end = end_medians(key)
        split_growth[key] = None if at_start is None or at_end is None else round(at_end - at_start, 2)
    growth_of_samples = growth_percent(start["rss_mib"], end["rss_mib"])
    growth_of_medians = growth_percent(start_window, end_window)
    verdict = {
        "agents": arguments.agents,
        "minutes": arguments.minutes,
        "warm_up_minutes": warm_up,
        "goal_end_minute": goal_end,
        # Two samples, one at each end: what earlier runs' verdicts were.
        "rss_mib_after_warm_up": start["rss_mib"],
        "rss_mib_at_goal_end": end["rss_mib"],
        "rss_growth_percent": growth_of_samples,
        # The median of the last minute before the goal's end points: both
        # windows end a rollout cycle (rollouts start at minutes 1, 11, ...),
        # so one rollout's swing does not decide the verdict.
        "rss_mib_median_minutes_%g_to_%g" % (warm_up, warm_up + WINDOW_MINUTES): start_window,
        "rss_mib_median_minutes_%g_to_%g" % (goal_end - WINDOW_MINUTES, goal_end): end_window,
        "rss_growth_percent_of_medians": growth_of_medians,
        # Where the growth between the two medians is, in MiB.
        "rss_split_growth_mib_of_medians": split_growth,
        "rss_mib_at_end": samples[-1]["rss_mib"],
        "rss_growth_percent_to_end": growth_percent(start["rss_mib"], samples[-1]["rss_mib"]),
        "medians_per_rollout_cycle": cycles,
        "allocated_mib_after_warm_up_and_at_goal_end": allocated if not ({"", None} & set(allocated)) else None,
        "descriptors_min_max_after_warm_up": [min(r["descriptors"] for r in window), max(r["descriptors"] for r in window)],
        "tasks_min_max_after_warm_up": [min(r["tasks"] for r in window), max(r["tasks"] for r in window)],
        "rss_goal_met_by_samples": growth_of_samples < 5,
        "rss_goal_met_by_medians": growth_of_medians is not None and growth_of_medians < 5,
    }
    (out / "verdict.json").write_text(json.dumps(verdict, indent=2) + "\n")
    print(json.dumps(verdict, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plot
    except ImportError:
        print("matplotlib is missing: no plot (pip install matplotlib)")
        return
    figure, axes = plot.subplots(4, 1, figsize=(8, 10), sharex=True)
    minutes = [row["minute"] for row in samples]
    for axis, (key, label) in zip(
        axes,
        [("rss_mib", "RSS (MiB)"), ("descriptors", "open descriptors"), ("tasks", "tasks (threads)"),
         ("database_files_open", "database files open")],
    ):
        if earlier:
            axis.plot([row["minute"] for row in earlier], [row[key] for row in earlier],
                      color="tab:gray", label=arguments.compare_label)
        axis.plot(minutes, [row[key] for row in samples], color="tab:blue", label="this run")
        if key == "rss_mib" and all(row["allocated_mib"] not in ("", None) for row in samples):
            axis.plot(minutes, [row["allocated_mib"] for row in samples], color="tab:green",
                      linestyle="--", label="allocated (live data, the allocator's count)")
        axis.set_ylabel(label)
        axis.grid(True)
    for minute in range(1, arguments.minutes + 1):
        if is_rollout_minute(minute, arguments):
            axes[0].axvline(minute, color="tab:orange", linestyle=":", linewidth=1)
    axes[0].plot([], [], color="tab:orange", linestyle=":", label="rollout started")
    axes[0].legend(loc="lower right")
    axes[0].set_title(f"flotte-server soak: {arguments.agents} simulated agents with churn")
    axes[-1].set_xlabel("minutes")
    figure.tight_layout()
    figure.savefig(out / "soak.png", dpi=80)
    print("plot:", out / "soak.png")


if __name__ == "__main__":
    main()
