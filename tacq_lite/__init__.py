"""tacq_lite: learn and use Task-Circuit Quantization (Xiao et al., 2025, arXiv 2504.07389)."""
from .config import QuantConfig
from .model.hf_quantizer import register as _register_with_transformers
from .model.loading import load_model, tiny_llama

_register_with_transformers()  # AutoModelForCausalLM.from_pretrained(saved folder) loads the packed model

__version__ = "0.1.0"

__all__ = ["QuantConfig", "load_model", "tiny_llama", "quantize_model", "__version__"]


def __getattr__(name):  # keep `import tacq_lite` light: quantize_model pulls in GPTQ and friends lazily
    if name == "quantize_model":
        from .run.experiment import quantize_model

        return quantize_model
    raise AttributeError(name)
