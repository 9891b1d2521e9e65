"""``python vision.py ARGS`` for the tests: each run in a process of its own, forked from an interpreter that has
imported the training stack once.

Why: a fresh interpreter spends about 7-9 s of CPU importing torch, torchvision, Opacus and SciPy before a tiny
run's first step, and the suite starts dozens of runs, on two cores. multiprocessing's forkserver imports those
modules once per test worker and forks every run from that state, which no test has touched. Each run is still
its own process, as a researcher's is: its own globals, signal handlers, working directory and environment, an
exit code, and stdout and stderr read back as a pipe gives them (no terminal, so no live bars). What it skips is
only the import. A test that is about the interpreter itself (a bad flag answered before torch is imported)
passes ``fresh_interpreter=True`` to :func:`tests.conftest.run_cli`.
"""
from __future__ import annotations

import atexit
import io
import multiprocessing
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VISION = REPO / "vision.py"

# What a training run imports before its first step (python -X importtime vision.py ...): the bulk of it is torch,
# SciPy (Opacus's accountants), sympy (torch's symbolic shapes, through torchvision.ops) and torchvision.
PRELOADED = ("torch", "torchvision", "opacus", "scipy.stats", "src.train", "src.cli", "src.config", "src.datasets",
             "src.plan", "src.resume", "src.eval_only", "tests.cli_process")

_context = None


def _forkserver():
    """The worker's forkserver context, started once with the training stack preloaded."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(list(PRELOADED))
    return _context


def _text_stream(fd: int) -> io.TextIOWrapper:
    """Unbuffered text over a file descriptor, as ``PYTHONUNBUFFERED=1`` gives a fresh interpreter."""
    return io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), encoding="utf-8", errors="backslashreplace",
                            write_through=True)


def _exit_code(value) -> int:
    """What the interpreter makes of ``sys.exit(value)``."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    print(value, file=sys.stderr)
    return 1


VISION_MAIN = "import sys, vision\nsys.exit(vision.main(sys.argv[1:]))\n"


def _run_script(code: str, argv: list[str], cwd: str, env: dict, out_path: str, err_path: str,
                append: bool = False, new_session: bool = False) -> None:
    """In the forked child: become ``python ARGV[0] ARGV[1:]`` running ``code`` in ``cwd`` with ``env``, and exit
    with its code. Output goes to ``out_path`` and ``err_path`` (appended to with ``append``, as to an open log)."""
    if new_session:
        os.setsid()
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out_path), (2, err_path)):
        target = os.open(path, os.O_WRONLY | (os.O_APPEND if append else os.O_TRUNC))
        os.dup2(target, fd)
        os.close(target)
    sys.stdout, sys.stderr = _text_stream(1), _text_stream(2)
    sys.argv = list(argv)
    try:
        exec(compile(code, argv[0], "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        status = 0
    except SystemExit as stop:
        status = _exit_code(stop.code)
    except BaseException:  # what the interpreter prints for an uncaught exception
        traceback.print_exc()
        status = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def run_forked(command: list[str], code: str, cwd: Path, env: dict | None = None,
               timeout: float = 600) -> subprocess.CompletedProcess:
    """``subprocess.run(COMMAND, capture_output=True, text=True)`` for a COMMAND ``[python, SCRIPT, *ARGS]`` or
    ``[python, "-c", CODE, *ARGS]`` whose source is ``code``, without the imports."""
    argv = ["-c" if command[1] == "-c" else command[1], *command[2 + (command[1] == "-c"):]]
    env = dict(os.environ if env is None else env)
    with tempfile.TemporaryDirectory(prefix="vision-run-") as folder:
        out_path, err_path = os.path.join(folder, "stdout"), os.path.join(folder, "stderr")
        for path in (out_path, err_path):
            Path(path).touch()
        child = _forkserver().Process(target=_run_script, args=(code, argv, str(cwd), env, out_path, err_path))
        child.start()
        child.join(timeout)
        timed_out = child.exitcode is None
        if timed_out:
            child.kill()
            child.join()
        stdout, stderr = (Path(path).read_text(errors="backslashreplace") for path in (out_path, err_path))
    if timed_out:
        raise subprocess.TimeoutExpired(command, timeout, output=stdout, stderr=stderr)
    return subprocess.CompletedProcess(command, child.exitcode, stdout, stderr)


def spawn_ranks(function, args: tuple, nprocs: int) -> None:
    """``torch.multiprocessing.spawn``, but forked from the preloaded forkserver: each rank is a process of its own
    without a fresh interpreter's imports (spawn's start method starts one per rank)."""
    import torch.multiprocessing

    _forkserver()  # the server starts with the training stack preloaded, whoever asks first
    torch.multiprocessing.start_processes(function, args=args, nprocs=nprocs, join=True, start_method="forkserver")


def run_vision(args: list[str], cwd: Path, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python vision.py ARGS``."""
    return run_forked([sys.executable, str(VISION), *args], VISION_MAIN, cwd, env, timeout)


def run_python_c(code: str, args: list, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -c CODE ARGS`` with this process's environment."""
    return run_forked([sys.executable, "-c", code, *map(str, args)], code, cwd, None, timeout)


class ForkedPopen:
    """What experiments.run asks of ``subprocess.Popen`` (``poll``, ``wait``, ``send_signal``) for a command
    ``[python, vision.py, *ARGS]`` whose output goes to an open log file: the same process, forked instead of
    started afresh. Tests of a study's or a sweep's logic patch it into ``experiments.run``; the runner's own test
    of signals (tests/test_preemption.py) keeps real processes."""

    def __init__(self, command: list, cwd=None, env=None, stdout=None, stderr=None, start_new_session=False,
                 **_ignored):
        assert Path(command[1]) == VISION, f"only vision.py runs fork: {command[:2]}"
        log = stdout.name  # the runner's open log file; stderr joins it (subprocess.STDOUT)
        self.args = command
        self._child = _forkserver().Process(
            target=_run_script, args=(VISION_MAIN, command[1:], str(cwd or os.getcwd()),
                                      dict(os.environ if env is None else env), log, log, True, start_new_session))
        self._child.start()
        self.pid = self._child.pid

    def poll(self):
        return self._child.exitcode

    def wait(self, timeout=None):
        self._child.join(timeout)
        if self._child.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._child.exitcode

    def send_signal(self, number: int) -> None:
        if self._child.exitcode is None:
            os.kill(self.pid, number)
