"""Where the CPU goes while `phimm bench serve`'s clients drive one continuous `phimm serve` (the embedded model):
the seconds each process spends (the clients, the HTTP process, the engine's worker) against the wall time. On a
2-core machine the clients and the HTTP process share the core the engine does not use; whatever they need beyond
it is taken from the engine.

    PYTHONPATH=. python benchmarks/serve_cpu.py --requests-per-client 16 [--unique-media] [--py-spy runs/spy]

Not a test: figures depend on the machine's load.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            out += [int(x) for x in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
    return out


def own_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def main(argv=None) -> int:
    from phimm import bench_serve as bs

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests-per-client", type=int, default=16)
    p.add_argument("--unique-media", action="store_true")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--py-spy", default=None, metavar="DIR",
                   help="also record each server process with py-spy (raw stacks) into DIR")
    args = p.parse_args(argv)

    items = bs.make_items("embedded", args.clients, args.requests_per_client, 0, args.max_tokens, False,
                          args.unique_media)
    bodies = {i.index: i.chat_body(i.tokens, i.tokens) for client in items for i in client}
    port = bs.free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "phimm.cli", "serve", "--port", str(port), "--max-running", str(args.clients),
           "--log-level", "warning"]
    log = Path("runs") / "serve-cpu.log"
    with bs.server_process(cmd, url, log, 300.0) as proc:
        http = bs.StreamClient(url, 60.0)
        for item in bs._one_per_kind(items):  # warm-up, not measured
            bs.send_streamed(http, url, item, item.chat_body(2), 60.0)
        http.close()
        pids = {"http process": proc.pid}
        pids.update({f"child {k}": c for k, c in enumerate(children(proc.pid))})
        spies = []
        if args.py_spy:
            Path(args.py_spy).mkdir(parents=True, exist_ok=True)
            for name, pid in pids.items():
                out = Path(args.py_spy) / f"{name.replace(' ', '-')}.txt"
                spies.append(subprocess.Popen(["py-spy", "record", "-p", str(pid), "-r", "250", "--format", "raw",
                                               "--nonblocking", "-o", str(out)],
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(1.0)
        before = {k: cpu_s(v) for k, v in pids.items()}
        own0, t0 = own_cpu_s(), time.perf_counter()

        @contextlib.contextmanager
        def sender():
            client = bs.StreamClient(url, 60.0)
            try:
                yield lambda item: bs.send_streamed(client, url, item, bodies[item.index], 60.0)
            finally:
                client.close()

        records = bs.run_clients(items, sender, 0.01)
        wall, own = time.perf_counter() - t0, own_cpu_s() - own0
        after = {k: cpu_s(v) for k, v in pids.items()}
        for spy in spies:
            spy.send_signal(signal.SIGINT)
            spy.wait()
    errors = sum(1 for r in records if r.error)
    print(f"{len(records)} requests, {errors} errors, {wall:.2f} s: {len(records) / wall:.1f} requests/s")
    print(f"  clients (this process): {own:.2f} CPU s ({own / wall:.0%} of a core)")
    for name in pids:
        used = after[name] - before[name]
        print(f"  {name}: {used:.2f} CPU s ({used / wall:.0%} of a core)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
