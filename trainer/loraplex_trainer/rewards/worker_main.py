"""The reward worker: a fresh interpreter that loads the user's reward function and scores batches.

python_worker.py runs a copy of this file as a script (``python worker_main.py FILE FUNCTION
CONFIG``, CONFIG a JSON object of limits); it imports only the standard library, so nothing of
the trainer (torch, adapters, other experiments) exists here. Before the user's module loads,
the worker limits itself (address space, file size, open files, no core dumps; processes when
it has a uid of its own) and arranges to die with its parent. Protocol, one JSON object per
line on the original stdin/stdout:

- on start the worker writes ``{"ready": true}`` or ``{"error": {...}}`` and exits;
- each request ``{"samples": [[prompt, completion, row], ...]}`` gets ``{"rewards": [...]}`` or
  ``{"error": {"type", "message", "sample", "line", "traceback"}}``;
- end of input ends the worker.
"""

import ctypes
import ctypes.util
import importlib.util
import json
import numbers
import os
import resource
import signal
import sys
import traceback
from typing import Any, TextIO

MODULE_NAME = "loraplex_user_reward"


LIMITS: dict[str, Any] = {}
"""The limits this worker runs under (from its config), to name the one an error ran into."""


def _limit_hit(exc: BaseException) -> str:
    """`` (limit: ...)`` when the exception is what hitting one of the worker's limits raises."""
    if isinstance(exc, MemoryError) and "memory_bytes" in LIMITS:
        return f" (limit: memory, {LIMITS['memory_bytes']} bytes of address space per worker)"
    if isinstance(exc, BlockingIOError) and LIMITS.get("own_uid"):
        return f" (limit: processes, {LIMITS['processes']} per worker)"
    if isinstance(exc, OSError) and exc.errno == 27 and "file_bytes" in LIMITS:  # EFBIG
        return f" (limit: file size, {LIMITS['file_bytes']} bytes)"
    if isinstance(exc, OSError) and exc.errno == 24 and "open_files" in LIMITS:  # EMFILE
        return f" (limit: open files, {LIMITS['open_files']})"
    return ""


def _error(exc: BaseException, path: str, sample: int | None = None) -> dict[str, Any]:
    """Describe an exception of the user's code, with the line of the user's file it came from."""
    line = getattr(exc, "lineno", None) if isinstance(exc, SyntaxError) else None
    for frame in traceback.extract_tb(exc.__traceback__):
        if os.path.abspath(frame.filename) == path:
            line = frame.lineno
    return {
        "type": type(exc).__name__,
        # str() of a SyntaxError repeats the file and line, which "line" already carries.
        "message": (exc.msg if isinstance(exc, SyntaxError) else str(exc)) + _limit_hit(exc),
        "sample": sample,
        "line": line,
        "traceback": "".join(traceback.format_exception(exc)),
    }


def _load(path: str, function: str) -> Any:
    spec = importlib.util.spec_from_file_location(MODULE_NAME, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    # Registered so pickling, dataclasses and typing inside the user's module can find it.
    sys.modules[MODULE_NAME] = module
    spec.loader.exec_module(module)
    if not hasattr(module, function):
        raise AttributeError(f"the file defines no {function!r}")
    fn = getattr(module, function)
    if not callable(fn):
        raise TypeError(f"{function!r} is not callable: it is the {type(fn).__name__} {repr(fn)[:40]}")
    return fn


def _score(fn: Any, samples: list[list[Any]], path: str) -> dict[str, Any]:
    rewards = []
    for i, (prompt, completion, row) in enumerate(samples):
        try:
            value = fn(prompt, completion, row)
        except Exception as exc:  # the user's bug, reported back; the worker lives on
            return {"error": _error(exc, path, sample=i)}
        if not isinstance(value, numbers.Real):
            shown = repr(value)[:80]
            message = f"returned {type(value).__name__} {shown}, expected a float"
            return {"error": {"type": "TypeError", "message": message, "sample": i, "line": None}}
        rewards.append(float(value))
    return {"rewards": rewards}


def _send(out: TextIO, message: dict[str, Any]) -> None:
    out.write(json.dumps(message) + "\n")
    out.flush()


# Signal system calls per architecture: (audit arch, kill, tkill, tgkill, rt_sigqueueinfo, pidfd_send_signal).
_SIGNAL_CALLS = {
    "x86_64": (0xC000003E, 62, 200, 234, 129, 424),
    "aarch64": (0xC00000B7, 129, 130, 131, 138, 424),
}


def _forbid_foreign_signals() -> bool:
    """A seccomp filter: this process and its children may signal only this worker and its group.

    So reward code cannot kill the trainer or another worker even where they share its uid (a
    laptop); kill(-1) is refused too. Returns False where seccomp is not available.
    """
    import platform
    import struct

    calls = _SIGNAL_CALLS.get(platform.machine())
    libc_name = ctypes.util.find_library("c")
    if calls is None or libc_name is None:
        return False
    arch, kill, tkill, tgkill, sigqueue, pidfd_signal = calls
    own = os.getpid()
    allow, deny = 0x7FFF0000, 0x00050000 | 1  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EPERM
    # (code, jump-if-true label, jump-if-false label, k); labels resolve to relative offsets below.
    ld, jeq, ret = 0x20, 0x15, 0x06
    program: list[tuple[int, str | None, str | None, int]] = [
        (ld, None, None, 4),  # arch
        (jeq, None, "allow", arch),
        (ld, None, None, 0),  # syscall number
        (jeq, "group", None, kill),
        (jeq, "own", None, tkill),
        (jeq, "own", None, tgkill),
        (jeq, "own", None, sigqueue),
        (jeq, "deny", None, pidfd_signal),
        (ret, None, None, allow),
    ]
    labels = {"group": len(program)}
    program += [
        (ld, None, None, 16),  # args[0], low 32 bits: the target pid
        (jeq, "allow", None, own),
        (jeq, "allow", None, 0),  # kill(0): own process group
        (jeq, "allow", "deny", (1 << 32) - own),  # kill(-pgid): the worker leads its group
    ]
    labels["own"] = len(program)
    program += [(ld, None, None, 16), (jeq, "allow", "deny", own)]
    labels["allow"] = len(program)
    program.append((ret, None, None, allow))
    labels["deny"] = len(program)
    program.append((ret, None, None, deny))

    def offset(at: int, label: str | None) -> int:
        return 0 if label is None else labels[label] - at - 1

    raw = b"".join(
        struct.pack("HBBI", code, offset(i, jt), offset(i, jf), k)
        for i, (code, jt, jf, k) in enumerate(program)
    )
    filters = ctypes.create_string_buffer(raw)

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    prog = Program(len(program), ctypes.cast(filters, ctypes.c_void_p))
    libc = ctypes.CDLL(libc_name, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        return False
    return bool(libc.prctl(22, 2, ctypes.byref(prog), 0, 0) == 0)  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER


_READ_ONLY_SYSTEM = ("/usr", "/lib", "/lib64", "/bin", "/etc", "/opt")
_DEVICES = ("/dev/null", "/dev/urandom", "/dev/random")


def _restrict_filesystem(home: str, readable: list[str]) -> int:
    """Landlock: from here on this process and its children may write only ``home`` and read only
    ``home``, ``readable`` (the interpreter and its libraries) and system folders.

    Unprivileged and per process, so it also holds on a laptop where the worker shares the
    trainer's uid: other experiments' folders, the base model and the trainer's files are out of
    reach. Returns the Landlock ABI used, or 0 where the kernel has none.
    """
    import struct

    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return 0
    libc = ctypes.CDLL(libc_name, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    abi = int(libc.syscall(444, None, 0, 1))  # landlock_create_ruleset(NULL, 0, VERSION)
    if abi < 1:
        return 0
    execute, write_file, read_file, read_dir = 1 << 0, 1 << 1, 1 << 2, 1 << 3
    handled = (1 << 13) - 1  # every right of ABI 1: execute ... make_sym
    if abi >= 2:
        handled |= 1 << 13  # refer
    if abi >= 3:
        handled |= 1 << 14  # truncate
    file_rights = execute | write_file | read_file | ((1 << 14) if abi >= 3 else 0)
    ruleset = libc.syscall(444, ctypes.c_char_p(struct.pack("=Q", handled)), 8, 0)
    if ruleset < 0:
        return 0

    def allow(path: str, access: int) -> None:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            return  # a path that does not exist grants nothing
        try:
            if not os.path.isdir(path):
                access &= file_rights
            rule = struct.pack("=Qi", access, fd)
            libc.syscall(445, ruleset, 1, ctypes.c_char_p(rule), 0)  # landlock_add_rule, PATH_BENEATH
        finally:
            os.close(fd)

    for path in {*_READ_ONLY_SYSTEM, *readable}:
        allow(path, execute | read_file | read_dir)
    for device in _DEVICES:
        allow(device, read_file | write_file)
    allow(home, handled)
    if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.syscall(446, ruleset, 0) != 0:  # landlock_restrict_self
        os.close(ruleset)
        return 0
    os.close(ruleset)
    return abi


def _tasks_of_uid(uid: int) -> int:
    """Threads of every process of ``uid`` now: what RLIMIT_NPROC counts."""
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry}/task"))
            except OSError:
                continue
    return count


def _confine(config: dict[str, Any]) -> None:
    """Limits and the parent-death signal, set before any user code runs (they cannot be raised again)."""
    limits = [
        (resource.RLIMIT_AS, config["memory_bytes"]),
        (resource.RLIMIT_FSIZE, config["file_bytes"]),
        (resource.RLIMIT_NOFILE, config["open_files"]),
        (resource.RLIMIT_CORE, 0),
    ]
    if config.get("own_uid"):  # counted per uid: the worker's processes are all there is
        limits.append((resource.RLIMIT_NPROC, config["processes"]))
    elif os.getuid() != 0:  # shared with the trainer: allow what the uid runs already, plus the bound
        limits.append((resource.RLIMIT_NPROC, _tasks_of_uid(os.getuid()) + config["processes"]))
    for which, value in limits:
        resource.setrlimit(which, (value, value))
    libc_name = ctypes.util.find_library("c")
    if sys.platform.startswith("linux") and libc_name:
        libc = ctypes.CDLL(libc_name)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: die with the trainer
        # Non-dumpable: another worker of the same uid cannot read this one's memory or ptrace it.
        libc.prctl(4, 0, 0, 0, 0)
        if os.getppid() != config["parent"]:  # the trainer died before the line above
            os._exit(1)
    config["signals_confined"] = _forbid_foreign_signals()
    # What the interpreter reads from (stdlib, lib-dynload, site-packages) stays readable.
    readable = [p for p in sys.path if p] + [sys.prefix, sys.base_prefix, sys.exec_prefix]
    config["landlock_abi"] = _restrict_filesystem(
        os.getcwd(), [os.path.realpath(p) for p in readable] + readable
    )


def main() -> None:
    """Load the function named on the command line, then answer requests until stdin closes."""
    path, function = os.path.abspath(sys.argv[1]), sys.argv[2]
    config = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    if config:
        _confine(config)
        LIMITS.update(config)
    # As a script, this folder is sys.path[0]; the user's folder (a copy, with the .py files
    # that sat beside the reward, so helper modules import) belongs there.
    sys.path[0] = os.path.dirname(path)
    # Keep the protocol on private copies of the pipes: a print() in user code goes to stderr
    # and an input() sees end of file, neither can corrupt the stream of replies.
    requests = os.fdopen(os.dup(0), "r", encoding="utf-8")
    replies = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)

    try:
        fn = _load(path, function)
    except BaseException as exc:  # includes SyntaxError and SystemExit from module top level
        _send(replies, {"error": _error(exc, path)})
        return
    confinement = {k: LIMITS[k] for k in ("landlock_abi", "signals_confined", "own_uid") if k in LIMITS}
    _send(replies, {"ready": True, "confinement": confinement})
    for line in requests:
        _send(replies, _score(fn, json.loads(line)["samples"], path))


if __name__ == "__main__":
    main()
