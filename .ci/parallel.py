"""Runs the test suite under each Keras backend, and the cross-backend comparison, in parallel.

tox's ``backends`` env runs this, so that one env (the frameworks installed once)
does the work of the jax, tensorflow, torch and cross envs::

    python .ci/parallel.py [--cross] [--backends B,B] [--jobs N] [--logs DIR] [--] [PYTEST ARGS...]

runs ``pytest -p no:cacheprovider PYTEST ARGS`` once with each of
``KERAS_BACKEND=jax``, ``tensorflow`` and ``torch`` (or the comma-separated
``--backends``) and, with ``--cross``, the
cross env's two commands (``kgrad compare --zoo`` and ``kgrad compare``, a part
each, so that the two CPUs stay busy to the end). Options
are read up to the first argument that is not one of them; the rest goes to
pytest. Up to N parts (default: the number of CPUs) run at a time, started in
the order above. Each part's output goes to a file (in DIR, default a
temporary folder) and is printed whole when the part ends. The exit status is 1
when any part fails; pytest's exit status 5 (no tests collected) is a failure.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

BACKENDS = ("jax", "tensorflow", "torch")
# The cross env's commands (tox.ini), each a part of its own: (name, command).
# CI compares the three quick demos (MLP, CNN, LSTM): the attention and MobileNet
# demos' architectures are in the zoo's CI subset (transformer_text, vit_tiny,
# MobileNet); `tox -e cross` and the README's main job run every demo.
CROSS = (("zoo", ["kgrad", "compare", "--zoo"]), ("compare", ["kgrad", "compare", "--quick"]))
HEARTBEAT_S = 300  # a line saying what still runs, this often
# pytest's exit statuses other than 0 (all passed) and 1 (some failed).
PYTEST_EXIT = {2: "interrupted", 3: "internal error", 4: "usage error", 5: "no tests collected"}


def _executable(name: str) -> str:
    """``name`` from the running interpreter's scripts folder (the tox env), else PATH."""
    found = shutil.which(name, path=os.path.dirname(sys.executable)) or shutil.which(name)
    if found is None:
        sys.exit(f"parallel.py: {name} not found")
    return found


def _parse(argv: list[str]) -> tuple[bool, tuple[str, ...], int, str | None, list[str]]:
    cross, backends, jobs, logs = False, BACKENDS, None, None
    args = list(argv)
    while args:
        if args[0] == "--":
            args.pop(0)
            break
        if args[0] == "--cross":
            cross = True
            args.pop(0)
        elif args[0] in ("--backends", "--jobs", "--logs") and len(args) >= 2:
            option, value = args.pop(0), args.pop(0)
            if option == "--backends":
                backends = tuple(value.split(","))
                unknown = [b for b in backends if b not in BACKENDS]
                if unknown:
                    sys.exit(f"parallel.py: --backends takes {','.join(BACKENDS)}; got {value}")
            elif option == "--jobs":
                jobs = int(value)
            else:
                logs = value
        else:
            break
    if jobs is None:
        jobs = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cross, backends, max(1, jobs or 1), logs, args


def _parts(
    cross: bool, backends: tuple[str, ...], pytest_args: list[str]
) -> list[tuple[str, list[list[str]], dict]]:
    """(name, commands, environment changes) of every part, in starting order."""
    pytest = [_executable("pytest"), "-p", "no:cacheprovider", *pytest_args]
    parts = [(backend, [pytest], {"KERAS_BACKEND": backend}) for backend in backends]
    if cross:
        kgrad = _executable("kgrad")
        for name, command in CROSS:
            # Progress lines would only fill the log.
            env = {"KERAS_BACKEND": "jax", "KGRAD_PROGRESS": "0"}
            parts.append((name, [[kgrad, *command[1:]]], env))
    return parts


class Part:
    def __init__(self, name, commands, env, log_path):
        self.name, self.commands, self.log_path = name, commands, log_path
        self.env = dict(os.environ, **env)
        self.env_text = " ".join(f"{k}={v}" for k, v in env.items())
        self.step = 0
        self.proc = None
        self.code = None
        self.started = self.ended = None

    def _launch(self):
        with open(self.log_path, "a") as log:
            log.write(f"$ {self.env_text} {shlex.join(self.commands[self.step])}\n")
            log.flush()
            self.proc = subprocess.Popen(
                self.commands[self.step],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def start(self):
        self.started = time.monotonic()
        open(self.log_path, "w").close()
        self._launch()

    def poll(self) -> bool:
        """True once the part has ended (its commands run until one fails)."""
        code = self.proc.poll()
        if code is None:
            return False
        if code == 0 and self.step + 1 < len(self.commands):
            self.step += 1
            self._launch()
            return False
        self.code, self.ended = code, time.monotonic()
        return True

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def outcome(self) -> str:
        seconds = f"{self.ended - self.started:.0f} s"
        if self.code == 0:
            return f"ok ({seconds})"
        meaning = PYTEST_EXIT.get(self.code, "") if self.name in BACKENDS else ""
        return f"FAILED (exit {self.code}{': ' + meaning if meaning else ''}, {seconds})"


def _print_log(part: Part):
    bar = "=" * 30
    print(f"{bar} {part.name} [{part.env_text}]: output {bar}", flush=True)
    with open(part.log_path, errors="replace") as log:
        for line in log:
            sys.stdout.write(line)
    print(f"{bar} {part.name}: {part.outcome()} {bar}", flush=True)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    cross, backends, jobs, logs, pytest_args = _parse(argv)
    temp = None
    if logs is None:
        temp = tempfile.TemporaryDirectory(prefix="kgrad-parts-")
        logs = temp.name
    os.makedirs(logs, exist_ok=True)
    parts = [
        Part(name, commands, env, os.path.join(logs, f"{name}.log"))
        for name, commands, env in _parts(cross, backends, pytest_args)
    ]
    waiting, running = list(parts), []
    print(
        f"parallel.py: {', '.join(p.name for p in parts)}, {jobs} at a time; "
        f"each part's output is printed when it ends (logs in {logs})",
        flush=True,
    )
    signal.signal(signal.SIGTERM, _interrupt)
    last_beat = time.monotonic()
    try:
        while waiting or running:
            while waiting and len(running) < jobs:
                part = waiting.pop(0)
                part.start()
                running.append(part)
                print(f"parallel.py: {part.name} started", flush=True)
            for part in [p for p in running if p.poll()]:
                running.remove(part)
                _print_log(part)
            if running and time.monotonic() - last_beat >= HEARTBEAT_S:
                now = last_beat = time.monotonic()
                still = ", ".join(f"{p.name} ({now - p.started:.0f} s)" for p in running)
                print(f"parallel.py: still running: {still}", flush=True)
            time.sleep(0.5)
    except KeyboardInterrupt:
        for part in running:
            part.stop()
        print("parallel.py: interrupted; stopped " + ", ".join(p.name for p in running))
        return 130
    finally:
        if temp is not None:
            temp.cleanup()
    failed = [p for p in parts if p.code != 0]
    print("parallel.py: " + "; ".join(f"{p.name} {p.outcome()}" for p in parts), flush=True)
    if failed:
        print(f"parallel.py: failed: {', '.join(p.name for p in failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
