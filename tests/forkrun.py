"""`python -m wsss.run ...` for the tests, without paying the interpreter's start each time.

A fresh `python -m wsss.run` spends about 4 s of a tiny run's 8 on two cores importing torch, torchvision (which
imports torch._dynamo) and Hydra before it reads an argument. A fork server pays that once: one process per test
session imports `wsss.run`'s modules and computes nothing (so no thread pool exists to be copied), and forks a
child for each command. The child takes the command's working directory, environment, argv and file descriptors,
runs `wsss.run` as `__main__` exactly as `python -m` does, and exits with its status: the same entry point, exit
codes, stdout and stderr as a new interpreter, each run in a process of its own.

What a new interpreter reads at its start cannot change after the fork (PYTHON* variables, the dynamic loader's,
the thread count the OpenMP runtime parsed): a command whose environment changes one of those runs as a real
subprocess. A command to be killed mid-run (`tiny.kill_when`) has its process group killed by the test
process, as a real one's would be. OMP_NUM_THREADS is applied with
`torch.set_num_threads`, which is what the runtime's parse of it sets.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import resource
import runpy
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path

# Variables a running interpreter has already read: a change to one needs a new process.
_START_ONLY = ("PYTHON", "LD_", "MALLOC", "MKL_", "OPENBLAS", "GOMP", "KMP_", "CUDA", "TORCH_", "NCCL", "WSSS_DIST_")
_SERVE = "import sys; sys.path.insert(0, sys.argv[1]); import tests.forkrun as f; f.serve()"


# Imported inside functions by the stages (plots, TensorBoard, refiners, CLIP, COCO): 1.3 s of a tiny run's 3.5
# when each child imports them itself
_LAZY = (
    "matplotlib.figure",
    "matplotlib.backends.backend_agg",
    "torch.utils.tensorboard",
    "scipy.sparse.linalg",
    "pycocotools.coco",
    "pycocotools.mask",
    "pydensecrf.densecrf",
    "pydensecrf.utils",
    "open_clip",
    "timm",
)


def _warm() -> None:
    """Import what `python -m wsss.run` imports before it reads an argument, every wsss module, and the
    libraries the stages import lazily (where installed); no computation, so no thread pool exists."""
    import importlib
    import pkgutil

    from hydra.core.plugins import Plugins

    import wsss
    import wsss.provenance
    import wsss.run

    for mod in pkgutil.walk_packages(wsss.__path__, "wsss."):
        if mod.name != "wsss.run":  # run as __main__ only (runpy warns when it is already imported)
            importlib.import_module(mod.name)
    for name in _LAZY:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    Plugins.instance()  # Hydra's plugin scan, once

    # The import graph every cache key reads (0.7 s of parsing a run): a pure function of the sources, which
    # cannot change under a server (the test process restarts it when a wsss/*.py changes)
    wsss.provenance.import_graph()
    # As under `python -m`, wsss.run itself is run as __main__ only (runpy warns when it is already imported)
    del sys.modules["wsss.run"], wsss.run


def _child(req: dict) -> None:
    """In the forked child: become `python -m wsss.run *argv` in `req`'s cwd, environment and files; never
    returns."""
    code = 1
    try:
        os.setsid()  # a process group of its own, as start_new_session gives, so a timeout can kill all of it
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        fds = [
            os.open(os.devnull, os.O_RDONLY),
            os.open(req["stdout"], os.O_WRONLY),
            os.open(req["stderr"], os.O_WRONLY),
        ]
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        if req.get("read_only"):
            _read_only(req["read_only"])
        if req.get("fsize"):  # the file-size limit a preexec_fn would set
            resource.setrlimit(resource.RLIMIT_FSIZE, (req["fsize"], req["fsize"]))
        import torch

        import wsss

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
        sys.modules.pop("__main__", None)
        if req.get("script"):  # `python SCRIPT *argv`: the script's folder first on sys.path, as python puts it
            sys.argv = [req["script"], *req["argv"]]
            sys.path.insert(0, str(Path(req["script"]).parent))
            runpy.run_path(req["script"], run_name="__main__")
        else:
            sys.argv = [str(Path(wsss.__file__).parent / "run.py"), *req["argv"]]  # as `python -m` sets it
            runpy.run_module("wsss.run", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve() -> None:
    """The server's loop: one JSON request per line on stdin (one or more processes, each with its environment
    and output files), one JSON reply ({"pids"} at the forks, then {"rc"}) per line on stdout.

    Several processes are the ranks of one run: as torchrun does, the first to fail has the others killed, and
    the exit status is 1 if any failed (a single process's is its own)."""
    _warm()
    out = sys.stdout
    for line in sys.stdin:
        req = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pids = []
        for proc in req["procs"]:
            pid = os.fork()
            if pid == 0:
                sys.stdin.close()
                _child({**req, **proc})
            pids.append(pid)
        out.write(json.dumps({"pids": pids}) + "\n")
        out.flush()
        codes: dict[int, int] = {}
        while len(codes) < len(pids):
            pid, status = os.wait()
            codes[pid] = os.waitstatus_to_exitcode(status)
            if codes[pid] != 0:
                for other in set(pids) - set(codes):
                    _kill_group(other)
        rc = codes[pids[0]] if len(pids) == 1 else int(any(codes.values()))
        out.write(json.dumps({"rc": rc}) + "\n")
        out.flush()


def _read_only(paths: list[str]) -> None:
    """What `unshare -rm sh -c 'mount --bind -o ro P P && ...'` gives the command: a user namespace mapping this
    user to root, a private mount namespace, and each of `paths` bind-mounted over itself read-only."""
    libc = ctypes.CDLL(None, use_errno=True)

    def check(ok: int, what: str) -> None:
        if ok != 0:
            raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")

    uid, gid = os.getuid(), os.getgid()
    check(libc.unshare(0x10000000 | 0x00020000), "unshare(CLONE_NEWUSER | CLONE_NEWNS)")
    Path("/proc/self/setgroups").write_text("deny")
    Path("/proc/self/uid_map").write_text(f"0 {uid} 1")
    Path("/proc/self/gid_map").write_text(f"0 {gid} 1")
    ms_rdonly, ms_remount, ms_bind, ms_rec, ms_private = 1, 32, 4096, 16384, 1 << 18
    check(libc.mount(b"none", b"/", None, ms_rec | ms_private, None), "mount --make-rprivate /")
    for path in paths:
        p = os.fsencode(path)
        check(libc.mount(p, p, None, ms_bind, None), f"mount --bind {path}")
        check(libc.mount(p, p, None, ms_bind | ms_remount | ms_rdonly, None), f"mount -o remount,ro {path}")


def _kill_once(ready: Callable[[], bool], done: threading.Event, pids: list[int]) -> None:
    """SIGKILL the process groups of `pids` as soon as `ready()` holds, unless `done` (they exited) comes first."""
    while not done.is_set() and not ready():
        time.sleep(0.02)
    if not done.is_set():
        for pid in pids:
            _kill_group(pid)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # gone already
        os.killpg(pid, signal.SIGKILL)


class ForkServer:
    """The test process's handle on the server: started on first use, one command at a time."""

    def __init__(self, repo: Path) -> None:
        self.repo = repo
        self.proc: subprocess.Popen | None = None
        self.env: dict[str, str] = {}  # the server's environment at its start
        self.stamp: tuple = ()  # the wsss sources it imported (a change restarts it)
        self.lock = threading.Lock()

    def _sources(self) -> tuple:
        """(path, size, mtime_ns) of every wsss source file: what the server has imported must still be what a
        new interpreter would import."""
        files = sorted((self.repo / "wsss").rglob("*.py"))
        return tuple((str(f), (st := f.stat()).st_size, st.st_mtime_ns) for f in files)

    def _start(self) -> subprocess.Popen:
        stamp = self._sources()
        if self.proc is not None and (self.proc.poll() is not None or stamp != self.stamp):
            self.close()
        if self.proc is None:
            self.stamp = stamp
            self.env = dict(os.environ)
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _SERVE, str(self.repo)],
                cwd=self.repo,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                bufsize=1,
            )
        return self.proc

    def close(self) -> None:
        """Stop the server (it exits at the end of its input)."""
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
            self.proc = None

    def forkable(self, env: dict[str, str]) -> bool:
        """Whether a command with environment `env` can run in a child of the server: it changes nothing that an
        interpreter reads only at its start."""
        base = self.env if self.proc is not None else dict(os.environ)
        changed = {k for k in set(env) | set(base) if env.get(k) != base.get(k)}
        return not any(k.startswith(_START_ONLY) for k in changed)

    def run(
        self,
        argv: list[str],
        env: dict[str, str],
        timeout: float,
        cwd: Path | None = None,
        read_only: list[Path] = (),
        fsize: int = 0,
    ) -> subprocess.CompletedProcess:
        """`python -m wsss.run *argv` in a forked child in `cwd` (default the repository); a CompletedProcess as
        subprocess.run gives, or
        subprocess.TimeoutExpired once `timeout` seconds pass (the child's process group is killed).

        `read_only`: folders the command sees read-only (bind mounts in a mount namespace of its own, as
        `unshare -rm` and `mount --bind -o ro` give); `fsize`: a file-size limit in bytes (RLIMIT_FSIZE)."""
        options = {"read_only": [str(p) for p in read_only], "fsize": fsize}
        return self._run(argv, [{**env}], timeout, cwd, options=options)

    def run_script(
        self, script: Path, argv: list[str], env: dict[str, str], timeout: float
    ) -> subprocess.CompletedProcess:
        """`python SCRIPT *argv` in a forked child in the repository, as `run` does for `python -m wsss.run`."""
        return self._run(argv, [env], timeout, None, script=script)

    def kill_when(self, argv: list[str], env: dict[str, str], ready: Callable[[], bool], timeout: float) -> int:
        """`python -m wsss.run *argv` in a forked child whose process group gets SIGKILL as soon as `ready()`
        holds (or `timeout` seconds pass); its exit status (-9 when killed)."""
        return self._run(argv, [env], timeout, None, until=ready).returncode

    def run_ranks(
        self, argv: list[str], env: dict[str, str], nproc: int, timeout: float
    ) -> subprocess.CompletedProcess:
        """`torchrun --standalone --nproc_per_node=N -m wsss.run *argv` as N forked children: each has the
        variables torchrun gives a rank (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK, ROLE_RANK,
        MASTER_ADDR / MASTER_PORT of a free local port, one TORCHELASTIC_RUN_ID), so wsss starts its gloo group
        from the environment as under torchrun; rank 0 hosts the store (torchrun's agent is not there). stdout
        and stderr are rank 0's then rank 1's; the exit status is torchrun's (1 if a rank failed)."""
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        common = {"WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "ROLE_WORLD_SIZE": str(nproc)}
        common |= {"GROUP_RANK": "0", "GROUP_WORLD_SIZE": "1", "ROLE_NAME": "default", "MASTER_ADDR": "127.0.0.1"}
        common |= {"MASTER_PORT": str(port), "TORCHELASTIC_RUN_ID": uuid.uuid4().hex, "TORCHELASTIC_RESTART_COUNT": "0"}
        envs = [{**env, **common, "RANK": str(r), "LOCAL_RANK": str(r), "ROLE_RANK": str(r)} for r in range(nproc)]
        return self._run(argv, envs, timeout, None)

    def _run(
        self,
        argv: list[str],
        envs: list[dict[str, str]],
        timeout: float,
        cwd: Path | None,
        until: Callable[[], bool] | None = None,
        script: Path | None = None,
        options: dict | None = None,
    ) -> subprocess.CompletedProcess:
        args = [sys.executable, *([str(script)] if script else ["-m", "wsss.run"]), *argv]
        with self.lock, tempfile.TemporaryDirectory() as tmp:
            procs = []
            for k, env in enumerate(envs):
                files = {name: str(Path(tmp) / f"{name}{k}") for name in ("stdout", "stderr")}
                for path in files.values():
                    Path(path).touch()
                procs.append({"env": env, **files, **(options or {})})
            proc = self._start()
            proc.stdin.write(
                json.dumps({"argv": argv, "cwd": str(cwd or self.repo), "procs": procs, "script": str(script or "")})
                + "\n"
            )
            proc.stdin.flush()
            pids = json.loads(proc.stdout.readline())["pids"]
            expired = threading.Event()

            def expire() -> None:
                expired.set()
                for pid in pids:
                    _kill_group(pid)

            timer = threading.Timer(timeout, expire)
            timer.start()
            done = threading.Event()
            if until is not None:
                threading.Thread(target=_kill_once, args=(until, done, pids), daemon=True).start()
            try:
                reply = proc.stdout.readline()
            finally:
                done.set()
                timer.cancel()
            if not reply:
                raise RuntimeError("the fork server stopped; its stderr is in the test's output")
            stdout, stderr = (
                "".join(Path(p[n]).read_text(errors="replace") for p in procs) for n in ("stdout", "stderr")
            )
        if expired.is_set() and until is None:
            raise subprocess.TimeoutExpired(args, timeout, stdout, stderr)
        return subprocess.CompletedProcess(args, json.loads(reply)["rc"], stdout, stderr)
