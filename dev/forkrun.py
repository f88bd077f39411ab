"""
`python script.py args` without paying its imports each time, for test_all.py. Each of our scripts starts by
importing torch, diffusers and transformers: 5 s of a 6 s test run on 2 cores. forked() starts the script as a
process forked from a server that imported them once (multiprocessing's forkserver; the child runs the script as
python does, runpy with __name__ "__main__", and exits with its code): a process of its own per run, with its exit
code, os._exit and signals, its own resource tracker, and our modules as imported (none has run). multiprocessing
re-imports the parent's main script in every child: preload it too, and that import is all cached (a run that
stops at a bad flag takes 30 ms).
"""
import multiprocessing
import multiprocessing.util
import os
import runpy
import socket
import sys
import tempfile
import time
import traceback
from multiprocessing import resource_tracker

PRELOAD = ["diffusers.models.unets.unet_2d_condition", "diffusers.models.autoencoders", "diffusers.schedulers",
           "transformers.models.clip.modeling_clip", "transformers.models.t5.modeling_t5",
           "transformers.models.auto.tokenization_auto"]
_server = None


def _run_script(script, args, env, cwd, out, err):
    """A forked child: `python script args` in cwd with env, its stdout and stderr into the files out and err."""
    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    os.environ.update(env)
    os.chdir(cwd)
    tracker = resource_tracker.ResourceTracker()  # its own, as a process of its own has (tqdm's lock registers there)
    resource_tracker._resource_tracker = tracker
    for name in ("ensure_running", "register", "unregister", "getfd"):
        setattr(resource_tracker, name, getattr(tracker, name))
    sys.argv, sys.path[0] = [script, *args], os.path.dirname(os.path.abspath(script))  # as `python script` sets them
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:  # as the interpreter reports it: a message to stderr and 1, else the code
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush(), sys.stderr.flush()
    multiprocessing.util._exit_function()  # finalizers (tqdm's lock), as the interpreter's exit runs them
    os._exit(code)


def forked(script, args, env, cwd, main_module, timeout=3600, nproc=0):
    """Run `python script args` forked (see above) -> (exit code, stdout, stderr). main_module: the importable name
    of the caller's main script, preloaded with the libraries. nproc > 0: as `torchrun --standalone
    --nproc_per_node=nproc script args` runs it: nproc forked ranks (RANK, WORLD_SIZE, MASTER_ADDR/PORT set), the
    others killed when one fails, exit code 1 then (torchrun's); every rank's output, in rank order."""
    global _server
    if _server is None:
        _server = multiprocessing.get_context("forkserver")
        _server.set_forkserver_preload([main_module, *PRELOAD])
    ranks = [{}]
    if nproc:
        with socket.socket() as sock:  # a free port for the ranks' rendezvous
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        ranks = [dict(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)) for r in range(nproc)]
    with tempfile.TemporaryDirectory() as d:
        children = [_server.Process(target=_run_script, args=(script, args, {**env, **extra}, cwd, f"{d}/out{r}",
                                                              f"{d}/err{r}")) for r, extra in enumerate(ranks)]
        for child in children:
            child.start()
        end = time.time() + timeout
        first = None
        while any(c.is_alive() for c in children) and time.time() < end:
            if any(c.exitcode not in (None, 0) for c in children):  # one failed: torchrun stops the others
                first = next(r for r, c in enumerate(children) if c.exitcode not in (None, 0))
                for c in children:
                    c.kill()
            time.sleep(0.05)
        if any(c.is_alive() for c in children):
            for c in children:
                c.kill()
            raise AssertionError(f"{script} {' '.join(args)} still ran after {timeout} s")
        codes = [c.exitcode for c in children]
        read = [[open(p).read() if os.path.exists(p) else f"(no {p}: the fork failed)" for p in (f"{d}/out{r}",
                 f"{d}/err{r}")] for r in range(len(children))]
        code = codes[0] if not nproc else 0 if all(c == 0 for c in codes) else 1
        status = "".join(f"(forkrun: rank {r} exited {c}{' first' if r == first else ''})\n" for r, c in enumerate(codes)
                         if c != 0) if nproc else ""  # which rank failed (the others: -9, killed after it)
        return code, "".join(o for o, _ in read), status + "".join(e for _, e in read)
