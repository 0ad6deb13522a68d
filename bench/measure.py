#!/usr/bin/env python3
"""Run a command under `/usr/bin/time -v` and sample its memory while it runs.

    python3 bench/measure.py JSON_OUT -- COMMAND [ARGS...]

Writes JSON_OUT with
  wall_s         elapsed wall-clock time (/usr/bin/time's "Elapsed", 10 ms resolution)
  maxrss_kb      /usr/bin/time's "Maximum resident set size": the kernel's peak RSS (ru_maxrss)
                 of the command. It counts every resident page the process maps, including
                 file-backed pages of memory-mapped inputs that are in the page cache, so for a
                 tool that mmaps its inputs (smelt) it grows with what has been read, not with
                 what was allocated.
  peak_anon_kb   the largest RssAnon (+ RssShmem) seen in /proc/PID/status, sampled every
                 --interval seconds (default 0.02) over the command and its descendants: memory
                 the process allocated itself, file-backed pages excluded. A sampled maximum, so a
                 spike shorter than the interval can be missed.
  peak_file_kb   the largest RssFile seen (mapped file pages that were resident)
  peak_rss_kb    the largest VmRSS seen (sampled; compare with maxrss_kb)
  user_s, sys_s, cpu_percent, major_faults, minor_faults, exit_status
and prints the command's own output through. Exits with the command's status.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import time


def children(pid):
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    out += [int(x) for x in f.read().split()]
            except OSError:
                pass
    except OSError:
        pass
    return out


def status_kb(pid):
    vals = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    vals[k] = int(v.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return vals


def main():
    argv = sys.argv[1:]
    interval = 0.02
    if len(argv) >= 2 and argv[0] == "--interval":
        interval = float(argv[1])
        argv = argv[2:]
    if len(argv) < 3 or argv[1] != "--":
        sys.exit("usage: measure.py [--interval S] JSON_OUT -- COMMAND [ARGS...]")
    out_json, cmd = argv[0], argv[2:]
    fd, tfile = tempfile.mkstemp(prefix="smelt-bench-time.")
    os.close(fd)
    t0 = time.perf_counter()
    p = subprocess.Popen(["/usr/bin/time", "-v", "-o", tfile] + cmd)
    peak = {"anon": 0, "file": 0, "rss": 0}
    while p.poll() is None:
        # /usr/bin/time itself is tiny; measure its descendants (the command and its children).
        todo, pids = children(p.pid), []
        while todo:
            q = todo.pop()
            pids.append(q)
            todo += children(q)
        anon = file_ = rss = 0
        for q in pids:
            s = status_kb(q)
            anon += s.get("RssAnon", 0) + s.get("RssShmem", 0)
            file_ += s.get("RssFile", 0)
            rss += s.get("VmRSS", 0)
        peak["anon"] = max(peak["anon"], anon)
        peak["file"] = max(peak["file"], file_)
        peak["rss"] = max(peak["rss"], rss)
        time.sleep(interval)
    own_wall = time.perf_counter() - t0
    with open(tfile) as f:
        text = f.read()
    os.remove(tfile)

    def field(name, conv=float):
        m = re.search(r"^\s*" + re.escape(name) + r":\s*(.+)$", text, re.M)
        return conv(m.group(1).strip()) if m else None

    def wall(s):
        parts = [float(x) for x in s.split(":")]
        v = 0.0
        for x in parts:
            v = v * 60 + x
        return v

    res = {
        "command": cmd,
        "wall_s": field("Elapsed (wall clock) time (h:mm:ss or m:ss)", wall),
        "wall_s_sampler": round(own_wall, 3),
        "maxrss_kb": field("Maximum resident set size (kbytes)", int),
        "peak_anon_kb": peak["anon"],
        "peak_file_kb": peak["file"],
        "peak_rss_kb": peak["rss"],
        "user_s": field("User time (seconds)"),
        "sys_s": field("System time (seconds)"),
        "cpu_percent": field("Percent of CPU this job got", lambda s: float(s.rstrip("%"))),
        "major_faults": field("Major (requiring I/O) page faults", int),
        "minor_faults": field("Minor (reclaiming a frame) page faults", int),
        "exit_status": field("Exit status", int),
        "sample_interval_s": interval,
    }
    if res["wall_s"] is None:
        res["wall_s"] = res["wall_s_sampler"]
    with open(out_json, "w") as f:
        json.dump(res, f, indent=2)
        f.write("\n")
    sys.exit(p.returncode)


if __name__ == "__main__":
    main()
