"""Model: a mapped rwkv-lite file plus the forward pass of its RWKV version.

    model = rwkv_lite.load("eagle-7b-int8.safetensors")
    logits, state = model.forward(model.tokenizer.encode("Hello"))      # sequence mode over the prompt
    logits, state = model.forward([token], state)                       # one token at a time after that

Weights stay in the mapped file: every array used by the forward pass is a view of the map, and quantized
matrices are dequantised inside the kernels, so loading costs no copy of the weights.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from . import arch as arch_registry
from .arch.common import SOURCE
from .errors import FormatError, NumericalError, ResourceError
from .format import TOKENIZER_ARRAY, ModelFile, read_model_file, verify_checksums
from .kernels.threads import use_threads
from .schemes import get_scheme
from .state import State

CHUNK_TOKENS = 512      # sequence mode runs the prompt in chunks of this many tokens (bounds activation memory)


class WeightStore:
    """Named access to a model file's tensors: float32 vectors as views, matrices as kernel-backed objects."""

    def __init__(self, model_file: ModelFile):
        self.file = model_file
        self.tensors = model_file.tensors

    def has(self, name: str) -> bool:
        return name in self.tensors

    def role(self, name: str) -> str | None:
        return self._info(name).get("role")

    def _info(self, name: str) -> dict:
        info = self.tensors.get(name)
        if info is None:
            raise FormatError(f"{self.file.path}: tensor {name!r} is missing")
        return info

    def vector(self, name: str) -> np.ndarray:
        info = self._info(name)
        arr = self.file.arrays.get(name)
        if info.get("scheme") != "fp32" or arr is None or arr.dtype != np.float32:
            raise FormatError(f"{self.file.path}: tensor {name!r} should be stored as fp32")
        if list(arr.shape) != list(info["shape"]):
            raise FormatError(f"{self.file.path}: tensor {name!r} has shape {list(arr.shape)}, "
                              f"metadata says {info['shape']}")
        return arr

    def matrix(self, name: str):
        info = self._info(name)
        try:                                  # the scheme checks its arrays (rwkv_lite/schemes/)
            scheme = get_scheme(info["scheme"], **info.get("params", {}))
            matrix = scheme.open(name, self.file.arrays, tuple(info["shape"]))
        except (ValueError, TypeError, KeyError) as e:
            raise FormatError(f"{self.file.path}: tensor {name!r}: {e}") from None
        matrix.name = name                    # for calibration and diagnostics
        return matrix


class Model:
    """An RWKV model ready to run. Attributes: config (dict), tokenizer (or None), metadata, path."""

    def __init__(self, model_file: ModelFile):
        self.file = model_file
        self.path = model_file.path
        self.metadata = model_file.metadata
        if model_file.metadata.get("kind", "model") != "model":
            raise FormatError(f"{self.path}: not a model file (kind {model_file.metadata.get('kind')!r})")
        self.config = model_file.config
        version = str(self.config.get("version"))
        try:
            self.arch = arch_registry.module_for(version)
        except FormatError as e:
            raise FormatError(f"{self.path}: {e}") from None
        self.arch_config = check_config(model_file, self.arch)     # the typed config (arch/<version>.Config)
        store = WeightStore(model_file)
        self.weights = self.arch.load_weights(store, self.arch_config)
        self._store = store
        self._tokenizer = None
        self._initial_state = None
        self._default_state = None       # the file's initial state, built on first use (_start_state)
        self._state_shapes = self.arch.state_shapes(self.arch_config)

    @property
    def tokenizer(self):
        """The embedded tokenizer (None if the file has none), built on first use: the model itself runs on ids."""
        if self._tokenizer is None:
            self._tokenizer = _embedded_tokenizer(self.file) or False
        return self._tokenizer or None

    @tokenizer.setter
    def tokenizer(self, tokenizer):
        """Attach another tokenizer (or None) to this model, e.g. for a file converted without one."""
        self._tokenizer = tokenizer if tokenizer is not None else False

    # -- state ---------------------------------------------------------------------------------------------------
    def new_state(self) -> State:
        """The state every sequence starts from (forward(tokens, None), the serving engine): initial_state if
        one is set, else the file's (zeros, or a state-tuned time_state converted into the model)."""
        return self._start_state().copy()

    def reset_state(self, state: State) -> None:
        """Set `state` to new_state()'s values in place, reusing its memory (see forward_in_place for why a
        server reuses states)."""
        state.check_compatible(self.config)
        state.check_shapes(self._state_shapes)
        state.assign(self._start_state())

    def _start_state(self) -> State:
        """initial_state if one is set, else the file's initial state (built once and kept)."""
        if self._initial_state is not None:
            return self._initial_state
        if self._default_state is None:
            self._default_state = State(self.config, self.arch.init_state(self.arch_config, self._store))
        return self._default_state

    @property
    def initial_state(self) -> State | None:
        """A State set as this model's starting point (e.g. a state-tuned file: State.load(path, model)), or None."""
        return self._initial_state

    @initial_state.setter
    def initial_state(self, state: State | None) -> None:
        if state is not None:
            state.check_compatible(self.config)
            state.check_shapes(self._state_shapes)
            state = state.copy()
        self._initial_state = state

    # -- forward -------------------------------------------------------------------------------------------------
    def forward(self, tokens, state: State | None = None, all_logits: bool = False, observer=None):
        """Feed `tokens` (ids) starting from `state` (None: the initial state).

        Returns (logits, state): logits of the last token (vocab,), or of every token (T, vocab) with
        all_logits=True. Many tokens run in sequence mode (matrix-matrix products per chunk); the given state is
        not modified: the returned state is a new object.

        `observer(name, X)`, if given, is called before every product with a stored weight matrix (role
        'matrix' in the file, the head included) with the tensor's name and its input rows X (T, C) float32
        (the head: only the rows whose logits are computed); X must not be modified."""
        state = self.new_state() if state is None else state.copy()     # (forward_in_place checks it)
        return self.forward_in_place(tokens, state, all_logits, observer), state

    def forward_in_place(self, tokens, state: State, all_logits: bool = False, observer=None,
                         source: State | None = None) -> np.ndarray:
        """forward() that updates `state` itself instead of a copy, and returns only the logits: for a loop that
        owns its state (the serving engine's prompt reading; forward_batch updates in place too). Copying the
        state is cheap when its memory is reused, but a fresh copy's pages must first be faulted in (measured
        ~30 ms for the 12.6 MB state of a 1.5B model on a 2-core VM, about a tenth of reading a 64-token
        prompt). If the call fails, `state` is left part-way: discard it.

        `source`: start from this state instead (left unchanged; `state` receives the result and is only
        written): generate()'s double buffering. Where the version can (RWKV-5, 6 and 7, one token), the step
        reads the WKV memory from `source` itself rather than after a copy of the whole state into `state`."""
        if source is not None and source is not state:
            for s in (state, source):
                s.check_compatible(self.config)
                s.check_shapes(self._state_shapes)
            from_source = getattr(self.arch, "STEP_FROM_SOURCE", ()) if np.size(tokens) == 1 else ()
            for name, array in state.arrays.items():
                if name not in from_source:
                    np.copyto(array, source.arrays[name])
            if from_source:
                return self._forward(tokens, state, all_logits, observer,
                                     {name + SOURCE: source.arrays[name] for name in from_source})
        return self._forward(tokens, state, all_logits, observer, {})

    def _forward(self, tokens, state: State, all_logits, observer, sources: dict) -> np.ndarray:
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise ValueError("forward() needs at least one token")
        V = self.config["vocab_size"]
        if ids.min() < 0 or ids.max() >= V:
            bad = int(ids[(ids < 0) | (ids >= V)][0])
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{V - 1})")
        state.check_compatible(self.config)
        state.check_shapes(self._state_shapes)
        use_threads()
        outputs = []
        for start in range(0, ids.size, CHUNK_TOKENS):
            chunk = ids[start:start + CHUNK_TOKENS]
            last = start + CHUNK_TOKENS >= ids.size
            arrays = {**state.arrays, **sources} if sources else state.arrays
            if all_logits or last:
                outputs.append(self.arch.forward(self.weights, chunk, arrays, all_logits, _check_finite, observer))
            else:
                self.arch.forward(self.weights, chunk, arrays, False, _check_finite, observer)
        logits = np.concatenate(outputs) if all_logits else outputs[-1][0]
        if not np.isfinite(logits).all():
            raise NumericalError("NaN or Inf in the output logits (head / ln_out)")
        return logits

    def forward_batch(self, tokens, states: list[State], observer=None) -> np.ndarray:
        """Advance B independent sequences by one token each: tokens[b] is fed to states[b].

        Returns logits (B, vocab); each state is updated IN PLACE (unlike forward(), which copies), so a serving
        loop keeps one State per sequence. Every matrix product reads each weight once for all B rows, and row b
        equals `forward([tokens[b]], states[b])` bit for bit (tests/test_batched_decode.py). A row whose logits
        are not finite is returned as it is: the caller decides what to do with that one sequence. `observer`
        as in forward() (X holds one row per sequence). One sequence alone takes forward()'s single-token path
        (its fused launches and whole-block calls; the batched kernels pay off from two rows on)."""
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if ids.size != len(states) or ids.size == 0:
            raise ValueError(f"forward_batch() needs one token per state, got {ids.size} tokens and "
                             f"{len(states)} states")
        V = self.config["vocab_size"]
        if ids.min() < 0 or ids.max() >= V:
            bad = int(ids[(ids < 0) | (ids >= V)][0])
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{V - 1})")
        for state in states:
            state.check_compatible(self.config)
            state.check_shapes(self._state_shapes)
        if len({id(a) for s in states for a in s.arrays.values()}) != sum(len(s.arrays) for s in states):
            raise ValueError("forward_batch() was given the same state (or shared state arrays) twice")
        use_threads()
        if ids.size == 1:       # one sequence (a server with one client): the single-token path, the same bits
            return self.arch.forward(self.weights, ids, states[0].arrays, False, None, observer)
        return self.arch.forward_batch(self.weights, ids, [s.arrays for s in states], observer)

    def verify(self, progress=None) -> list[str]:
        """Recompute the file's checksums; returns the names of corrupted arrays (empty: intact).
        progress(done_bytes, total_bytes, None) as data is checked (rwkv_lite/progress.py)."""
        from .integrity import verify_checksums_in
        return verify_checksums_in(self.file, progress)

    def close(self) -> None:
        """Unmap the file; the model cannot run afterwards (closing twice is harmless)."""
        self.weights = None
        self.file.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- text ----------------------------------------------------------------------------------------------------
    def generate(self, prompt, **kwargs) -> str:
        """The text generated after `prompt` (text or ids): rwkv_lite.generate.generate_text(self, prompt, ...),
        same keyword arguments (max_tokens, params, stop, state). For streaming use rwkv_lite.stream_generate."""
        from .generate import generate_text
        return generate_text(self, prompt, **kwargs)


def _check_finite(x: np.ndarray, layer: int) -> None:
    if not np.isfinite(x).all():
        raise NumericalError(f"NaN or Inf in the residual stream after layer {layer}")


def _embedded_tokenizer(model_file: ModelFile):
    info = model_file.metadata.get("tokenizer") or {}
    if not isinstance(info, dict):
        raise FormatError(f"{model_file.path}: metadata 'tokenizer' is not a JSON object")
    kind = info.get("kind")
    if not kind or kind == "none":
        return None
    from .tokenizer import tokenizer_from_embedded
    data = model_file.arrays.get("tokenizer.data")
    try:
        tokenizer = tokenizer_from_embedded(kind, bytes(data) if data is not None else b"")
    except FormatError as e:            # its message names "<embedded ...>": say which file it is embedded in
        raise FormatError(f"{model_file.path}: {e}") from None
    vocab_size = model_file.config["vocab_size"]
    if tokenizer.vocab_size > vocab_size:
        raise FormatError(f"{model_file.path}: the embedded tokenizer has {tokenizer.vocab_size} ids but the "
                          f"model's vocabulary is {vocab_size}")
    return tokenizer


# ---------------------------------------------------------------------------------------------------------------
# Load-time consistency of the config with the stored tensors.
#
# The forward pass trusts the config: it sizes the state from it, and the WKV kernels (Numba, no bounds checks)
# index the state and their inputs with it. A file whose config disagrees with its tensors (n_embd 128 over arrays
# of 64, an n_head that does not divide the decays) would otherwise read or write outside arrays, so every number
# the forward pass uses is checked against the tensors once, here, from the version's own contract: its Config
# (the numbers and their relations) and tensor_shapes (every tensor's shape implied by them).

def check_config(model_file: ModelFile, arch=None):
    """The typed config of the file's version (arch/<version>.Config); FormatError (naming the file) when its
    numbers are not valid or disagree with the tensors' shapes."""
    path, tensors = model_file.path, model_file.tensors
    if arch is None:
        arch = arch_registry.module_for(str(model_file.config.get("version")))
    try:
        cfg = arch.Config.from_dict(model_file.config)
    except FormatError as e:
        raise FormatError(f"{path}: {e}") from None
    L, C, N = cfg.n_layer, cfg.n_embd, getattr(cfg, "head_size", None)
    # The state the config implies is small next to the weights for every real model; checking it keeps a file
    # from making us allocate far more than its own size.
    state_bytes = 4 * L * C * (5 + (N or 0))
    if state_bytes > max(path.stat().st_size, 1 << 20):
        raise FormatError(f"{path}: config n_layer={L}, n_embd={C}, head_size={N} implies a recurrent state of "
                          f"{state_bytes} bytes, more than the whole file")

    expected = arch.tensor_shapes(cfg)
    earlier = arch.earlier_shapes(cfg) if hasattr(arch, "earlier_shapes") else {}
    layers = set()
    for name, info in tensors.items():             # (read_model_file checked that every record is well formed)
        shape = tuple(info["shape"])
        want = expected.get(name)
        if name.startswith("blocks."):
            index, _, _ = name[len("blocks."):].partition(".")
            if not index.isdigit() or int(index) >= L:
                raise FormatError(f"{path}: tensor {name!r} is outside the n_layer={L} layers of the config")
            layers.add(int(index))
            if want is None:
                want = (C,)                        # any other tensor of a block must be a per-channel vector
        if want is not None and shape != want and not (info.get("role") == "vector" and shape == earlier.get(name)):
            raise FormatError(f"{path}: tensor {name!r} has shape {list(shape)} but the config implies "
                              f"{list(want)}")
    if len(layers) != L:
        raise FormatError(f"{path}: config says n_layer={L} but the file has tensors for {len(layers)} layers")
    return cfg


def memory_bytes() -> tuple[int, int]:
    """(total, available) physical memory in bytes, from /proc/meminfo (0, 0 where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info.get("MemTotal", 0), info.get("MemAvailable", 0)
    except (OSError, ValueError, IndexError):
        return 0, 0


def _weights_read_per_token(model_file: ModelFile) -> int:
    """The bytes of the file a token reads: all of it but the row-gathered tables (the embedding, DeepEmbed's
    s_emb: one row per token, paged in on use) and the tokenizer. What must fit in RAM to run at speed."""
    gathered = [name for name, info in model_file.tensors.items() if info.get("role") == "embedding"]
    skipped = sum(a.nbytes for key, a in model_file.arrays.items()
                  if key == TOKENIZER_ARRAY or any(key == g or key.startswith(g + ".") for g in gathered))
    return sum(a.nbytes for a in model_file.arrays.values()) - skipped


def check_fits_memory(path: Path, file_bytes: int) -> None:
    """Refuse a model whose weights cannot stay in RAM: every token reads all of them, so a model larger than the
    machine's memory would re-read the disk for every token (minutes per token) or be killed."""
    total, available = memory_bytes()
    if total and file_bytes > total:
        raise ResourceError(f"{path}: the model needs {file_bytes / 2**30:.1f} GiB but this machine has "
                            f"{total / 2**30:.1f} GiB of memory; convert it with a smaller --quant (int8, int4)")
    if available and file_bytes > available:
        import warnings
        warnings.warn(f"{path}: the model ({file_bytes / 2**30:.1f} GiB) is larger than the memory available now "
                      f"({available / 2**30:.1f} GiB): expect it to run slowly", stacklevel=3)


def _header_mentions(path: Path, needle: bytes) -> bool:
    """Whether the file's safetensors JSON header contains `needle` (read without mapping; False if unreadable)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            return 0 < n <= 100 << 20 and needle in f.read(n)
    except OSError:
        return False


def load(path: str | os.PathLike, verify: bool = False, progress=None) -> Model:
    """Map a model file and return a Model. `verify=True` also checks every array's checksum (reads the file).

    Refuses (ResourceError) a model whose per-token weights (_weights_read_per_token) exceed the machine's memory.
    A file mostly not in the page cache is read ahead on a background thread (rwkv_lite/readahead.py; the model
    is usable at once); `progress(done_bytes, total_bytes)` reports that read when it lasts over 2 s."""
    from .readahead import start_if_uncached
    path = Path(path)
    # A file larger than all of memory is refused from its size alone, before it is opened or mapped; the finer
    # check below counts only what each token reads (a DeepEmbed file's per-token tables are mostly never read).
    total, _ = memory_bytes()
    size = path.stat().st_size if path.is_file() else 0
    if total and size > total and not _header_mentions(path, b"s_emb"):
        check_fits_memory(path, size)
    model_file = read_model_file(path)
    try:
        check_fits_memory(path, _weights_read_per_token(model_file))
    except BaseException:
        model_file.close()
        raise
    if not verify:                         # verify reads the whole file anyway
        model_file.readahead = start_if_uncached(path, model_file._map, progress)
    if verify:
        bad = verify_checksums(model_file)
        if bad:
            model_file.close()
            raise FormatError(f"{path}: checksum mismatch in {len(bad)} array(s), e.g. {bad[0]!r}: file corrupted")
    return Model(model_file)
