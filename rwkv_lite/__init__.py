"""rwkv-lite: run RWKV language models on ordinary CPUs (NumPy + Numba, one memory-mapped quantized file).

    import rwkv_lite
    rwkv_lite.convert("RWKV-5-World-7B.pth", "eagle-7b-int8.safetensors", quant="int8")
    with rwkv_lite.load("eagle-7b-int8.safetensors") as model:
        print(model.generate("The Eiffel tower is in the city of", max_tokens=20))
        for step in rwkv_lite.stream_generate(model, "Once upon a time", rwkv_lite.SamplingParams(seed=1)):
            print(step.text, end="", flush=True)
        logits, state = model.forward(model.tokenizer.encode("The Eiffel tower is in the city of"))

(`rwkv_lite.generate` is the function; its module is still imported as `from rwkv_lite.generate import ...`.)
"""
__version__ = "0.1.0"

from . import kernel_cache  # noqa: E402  (first: Numba's cache folder must be set before any kernel is defined)

kernel_cache.configure()

from .errors import FormatError, NumericalError, RwkvLiteError, UnsafeCheckpointError  # noqa: E402
from .model import Model, load  # noqa: E402
from .sampling import SamplingParams  # noqa: E402
from .sequence import Step  # noqa: E402
from .generate import ChatSession, generate, stream_generate  # noqa: E402  (binds the name to the function)
from .state import State, install_tuned_state_reader  # noqa: E402
from .quantize.state_file import is_state_tuning_file, read_time_state  # noqa: E402

# State.load reads state tuners' files with the converter's readers; the runtime itself never imports the converter
install_tuned_state_reader(is_state_tuning_file, read_time_state)


def generate_batch(model, prompts, **kwargs):
    """Generate for many prompts with the batched engine, results in prompt order; see rwkv_lite.engine."""
    from .engine import generate_batch as _generate_batch
    return _generate_batch(model, prompts, **kwargs)


def convert(src, dst, quant="fp16", **kwargs):
    """Convert a checkpoint to an rwkv-lite file; see rwkv_lite.quantize.convert.convert."""
    from .quantize.convert import convert as _convert
    return _convert(src, dst, quant, **kwargs)


def verify(path, progress=None):
    """Check a model file's integrity; see rwkv_lite.integrity.verify_file."""
    from .integrity import verify_file
    return verify_file(path, progress)


__all__ = ["load", "convert", "verify", "generate", "stream_generate", "generate_batch", "ChatSession",
           "SamplingParams", "Step", "Model", "State", "RwkvLiteError", "FormatError", "NumericalError",
           "UnsafeCheckpointError", "__version__"]
