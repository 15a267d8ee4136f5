"""Where Numba keeps rwkv-lite's compiled kernels: a per-user cache folder, never the installed package.

Numba's default for ``cache=True`` functions is a ``__pycache__`` folder beside their source, i.e. inside
site-packages. That breaks read-only installs, and a later editable reinstall leaves the folder behind, where
Python then imports ``rwkv_lite`` as an empty namespace package. So before any kernel module is imported,
``configure()`` (run by ``rwkv_lite/__init__.py``) points Numba at, in order of preference:

    $RWKV_LITE_CACHE_DIR
    $NUMBA_CACHE_DIR                       (the user's own choice for all Numba code)
    the platform's per-user cache folder   ($XDG_CACHE_HOME/rwkv-lite or ~/.cache/rwkv-lite on Linux,
                                            ~/Library/Caches/rwkv-lite on macOS, %LOCALAPPDATA%\\rwkv-lite\\Cache
                                            on Windows)

Kernels live in a subfolder named by a digest of the package's Numba code (its files that mention numba). Numba
checks a cached function against its own source file only, but kernels inline helpers from other files (an
activation shared by two kernel modules, say): after a change to such a helper alone, the cached kernel would
silently keep the old code. A new digest means a fresh folder instead.

If that folder cannot be created or written, rwkv-lite's kernels run uncached (compiled again by every process)
and one notice says so on stderr; they never fall back to the package folder.

Numba has one cache folder per process (NUMBA_CACHE_DIR, which configure() sets when the user has not), so other
Numba-using code in a process that imports rwkv_lite caches there too, rather than beside its own sources.
"""
from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

ENV_VAR = "RWKV_LITE_CACHE_DIR"
PACKAGE = __name__.rpartition(".")[0]          # "rwkv_lite"

# Set by configure(): the folder in use, or None when kernels run uncached.
cache_dir: Path | None = None
_configured = False
_announcer_installed = False
_ctrl_c_deferral_installed = False


def default_cache_dir() -> Path:
    """The folder configure() tries, from the environment and the platform's convention."""
    for var in (ENV_VAR, "NUMBA_CACHE_DIR"):
        value = os.environ.get(var)
        if value:
            return Path(value).expanduser()
    home = Path.home() if _home_known() else None
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA")
        if base:
            return Path(base) / "rwkv-lite" / "Cache"
        return (home or Path(tempfile.gettempdir())) / "AppData" / "Local" / "rwkv-lite" / "Cache"
    if sys.platform == "darwin" and home is not None:
        return home / "Library" / "Caches" / "rwkv-lite"
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):                 # the XDG spec says to ignore a relative path
        return Path(xdg) / "rwkv-lite"
    if home is None:
        raise OSError("no home folder")
    return home / ".cache" / "rwkv-lite"


def source_digest(package_dir: Path | None = None) -> str:
    """A short digest of the package's Numba code: every .py file under the package folder that mentions numba
    (paths and contents). The kernel cache's subfolder name (see the module docstring); editing other files (the
    CLI, the server) does not recompile the kernels."""
    import hashlib
    root = Path(package_dir) if package_dir is not None else Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        text = path.read_bytes()
        if b"numba" in text:
            digest.update(path.relative_to(root).as_posix().encode("utf-8") + b"\0" + text)
    return digest.hexdigest()[:16]


def _home_known() -> bool:
    try:
        Path.home()
    except (RuntimeError, KeyError, OSError):      # no HOME and no passwd entry
        return False
    return True


def _usable(path: Path) -> bool:
    """Can the folder be created and a file written in it? (The same test Numba's locators apply.)"""
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError:
        return False
    return True


def configure() -> Path | None:
    """Point Numba's cache at the per-user folder (idempotent); returns it, or None when running uncached."""
    global cache_dir, _configured
    if _configured:
        return cache_dir
    _configured = True
    try:
        base, folder = default_cache_dir(), f"kernels-{source_digest()}"
        # (a child process inherits NUMBA_CACHE_DIR, already this folder)
        path = base if base.name == folder else base / folder
    except OSError:
        path = None
    if path is not None and _usable(path):
        cache_dir = path.resolve()
        os.environ["NUMBA_CACHE_DIR"] = str(cache_dir)     # read by Numba at import and on config reloads
        config = sys.modules.get("numba.core.config")
        if config is not None:                              # numba was imported before rwkv_lite
            config.CACHE_DIR = str(cache_dir)
        return cache_dir
    cache_dir = None
    _disable_caching()
    where = f"{path}" if path is not None else "no home folder"
    sys.stderr.write(f"rwkv-lite: cannot write the kernel cache ({where}); kernels will be compiled on every run "
                     f"(set {ENV_VAR} to a writable folder to keep them)\n")
    return None


def _disable_caching() -> None:
    """Make `cache=True` a no-op for rwkv-lite's own functions only (other packages keep Numba's behaviour)."""
    from numba.core.dispatcher import Dispatcher
    original = Dispatcher.enable_caching
    if getattr(original, "_rwkv_lite_uncached", False):
        return

    def enable_caching(self):
        module = getattr(self.py_func, "__module__", "") or ""
        if module == PACKAGE or module.startswith(PACKAGE + "."):
            return                                 # keeps the dispatcher's NullCache
        original(self)

    enable_caching._rwkv_lite_uncached = True
    Dispatcher.enable_caching = enable_caching


def announce_compiles(write=None) -> None:
    """Print one line the first time one of rwkv-lite's kernels is about to be compiled in this process.

    Numba fires the "numba:compile" event only when a function is really compiled, not when it is loaded from
    the cache, so cached runs print nothing."""
    global _announcer_installed
    if _announcer_installed:
        return
    _announcer_installed = True
    from numba.core import event

    write = write or (lambda line: (sys.stderr.write(line + "\n"), sys.stderr.flush()))
    announced = False

    class _Announcer(event.Listener):
        def on_start(self, ev):
            nonlocal announced
            if announced:
                return
            dispatcher = (ev.data or {}).get("dispatcher")
            module = getattr(getattr(dispatcher, "py_func", None), "__module__", "") or ""
            if module == PACKAGE or module.startswith(PACKAGE + "."):
                announced = True
                if cache_dir is not None:
                    write("compiling kernels (first run only)...")
                else:
                    write("compiling kernels (not cached, so on every run)...")

        def on_end(self, ev):
            pass

    event.register("numba:compile", _Announcer())


def defer_ctrl_c_during_compiles() -> None:
    """Make a Ctrl-C that arrives while Numba compiles take effect when the compile ends, never be lost.

    Python raises KeyboardInterrupt in whatever Python code runs next, and a compile runs many weakref callbacks
    and finalizers (Numba disposes of its typing contexts' globals that way), where an exception is printed as
    "Exception ignored" and dropped: the command would then run on to the end. So while the main thread compiles
    (Numba's "numba:compile" events, nested ones counted), SIGINT only records itself, and the end of the
    outermost compile raises KeyboardInterrupt at that one safe point. A handler the program installed itself is
    left alone."""
    global _ctrl_c_deferral_installed
    if _ctrl_c_deferral_installed:
        return
    _ctrl_c_deferral_installed = True
    from numba.core import event

    depth = 0
    pressed = []

    def record(signum, frame):
        pressed.append(signum)

    class _CtrlCDeferral(event.Listener):
        def on_start(self, ev):
            nonlocal depth
            if threading.current_thread() is not threading.main_thread():
                return
            depth += 1
            if depth == 1 and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                signal.signal(signal.SIGINT, record)

        def on_end(self, ev):
            nonlocal depth
            if threading.current_thread() is not threading.main_thread():
                return
            depth -= 1
            if depth == 0 and signal.getsignal(signal.SIGINT) is record:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                if pressed:
                    pressed.clear()
                    raise KeyboardInterrupt

    event.register("numba:compile", _CtrlCDeferral())
