"""`python -m adaplex ARGS` as a process, for the tests of the command line.

``run_cli`` forks each command from a server process that has imported adaplex and the libraries its
commands load (torch, transformers, PEFT, Lightning) once, so a command costs its own work and not
the ~4 s of those imports; the forked child runs ``adaplex.__main__`` as ``python -m adaplex`` does,
and its exit status, stdout and stderr are its own. What that skips, output printed while those
libraries are imported, ``real_cli`` checks: a fresh interpreter per command.
"""

from __future__ import annotations

import atexit
import json
import subprocess
import sys
import tempfile
from pathlib import Path

TIMEOUT_S = 300

SERVER = r"""
import json, os, pkgutil, runpy, signal, sys, traceback
import adaplex, adaplex.cli
adaplex.cli.quiet_libraries()  # as main() does before a command imports the libraries it needs
for module in pkgutil.walk_packages(adaplex.__path__, "adaplex."):
    if module.name != "adaplex.__main__":
        __import__(module.name)
sys.stdout.flush(); sys.stderr.flush()
print("ready", flush=True)
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # not the server's requests
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        sys.argv = [sys.executable, *request["args"]]
        signal.alarm(request["timeout"])  # its default action ends the child
        code = 0
        try:
            runpy.run_module("adaplex", run_name="__main__", alter_sys=True)
        except SystemExit as done:  # as the interpreter treats it: None is 0, an int itself, else printed and 1
            if isinstance(done.code, int):
                code = done.code
            elif done.code is not None:
                print(done.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps(os.waitstatus_to_exitcode(status)), flush=True)
"""


class _Server:
    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout.readline() == "ready\n", "the CLI server did not start"
        atexit.register(self.close)

    def run(self, args: list[str]) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory() as folder:
            out, err = Path(folder, "stdout"), Path(folder, "stderr")
            request = {"args": args, "stdout": str(out), "stderr": str(err), "timeout": TIMEOUT_S}
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            code = json.loads(self.process.stdout.readline())
            return subprocess.CompletedProcess(args, code, out.read_text(), err.read_text())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=TIMEOUT_S)


_server: _Server | None = None


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """``adaplex ARGS`` in a process forked from the server (started on first use)."""
    global _server
    if _server is None or _server.process.poll() is not None:
        _server = _Server()
    return _server.run([str(a) for a in args])


def real_cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m adaplex ARGS`` in a fresh interpreter."""
    command = [sys.executable, "-m", "adaplex", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)
